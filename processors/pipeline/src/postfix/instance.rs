//! A self-contained local Postfix: its own config dir, queue, mailboxes and log file, on a
//! loopback port, without systemd or syslog. This is the tested recipe of
//! `shared/reference/postfix.md` in Rust, used by the tests and by the pipeline's bring-up.
//!
//! Recipients (the recipe's table): addresses listed in [`Instance::set_mailboxes`] at
//! `localhost` are delivered into mbox files under `mail/`; any other `@localhost` address
//! bounces (5.1.1, unknown user); `@hardbounce.test` bounces (5.1.1); `@defer.test` and
//! `@softfail.test` are deferred then expire at once (`maximal_queue_lifetime = 0`); any other
//! domain bounces (5.4.4 "no route in test setup", which does not flag the address).
//!
//! The lookup tables (`vmailbox`, `transport`) are written *cold* ([`write_table`]): Postfix
//! reads a `texthash:` file modified within the last ~2 s as "hot" and, in every daemon that
//! opens it, waits in 300 ms steps until it is 2 s old (`dict_thash_open`). That stalled
//! every `smtpd` started in the first seconds after [`Instance::start`] or
//! [`Instance::set_mailboxes`] before its `220` greeting: 1.8-4.1 s on all eight first SMTP
//! connections of the latency bench (tcpdump; strace showed `smtpd` re-reading `vmailbox`
//! every 300 ms), which was the bench's one "~1.4 s stall per rep".
//!
//! Needs root (the daemons drop to `postfix`/`nobody`) and the `postfix` package
//! (`.ci/install-test-tools` installs it). Dropping an [`Instance`] stops it and waits for its
//! master process to exit.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Why an instance could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Postfix is not installed.
    #[error("postfix is not installed (run .ci/install-test-tools, or apt-get install postfix)")]
    NotInstalled,
    /// A file or command failed.
    #[error("postfix instance in {dir}: {what}: {source}")]
    Io {
        /// Instance dir.
        dir: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// `postfix start` failed or the port never answered.
    #[error("postfix instance in {dir} did not start: {detail} (see {dir}/postfix.log)")]
    Start {
        /// Instance dir.
        dir: PathBuf,
        /// Detail.
        detail: String,
    },
}

/// Whether the Postfix binaries the recipe needs are installed.
pub fn installed() -> bool {
    Path::new("/usr/lib/postfix/sbin/master").exists()
        && ["/usr/sbin/postfix", "/usr/bin/postfix"]
            .iter()
            .any(|p| Path::new(p).exists())
}

/// A free loopback port (bind :0, read it, release it). Postfix's master binds with
/// `SO_REUSEPORT`, so a clash would not fail: [`Instance::start`] checks the port is closed.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// A running instance; stopped on drop.
#[derive(Debug)]
pub struct Instance {
    dir: PathBuf,
    port: u16,
    running: bool,
}

impl Instance {
    /// Creates (or reuses) the instance in `dir` and starts it on `127.0.0.1:port`; returns
    /// when the port answers. `name` is the log's program prefix (`syslog_name`).
    pub fn start(dir: &Path, port: u16, name: &str) -> Result<Instance, Error> {
        if !installed() {
            return Err(Error::NotInstalled);
        }
        let dir = std::path::absolute(dir).map_err(|source| Error::Io {
            dir: dir.to_owned(),
            what: "resolving",
            source,
        })?;
        let io = |what: &'static str| {
            let dir = dir.clone();
            move |source| Error::Io { dir, what, source }
        };
        if port_open(port) {
            return Err(Error::Start {
                dir,
                detail: format!("port {port} is already in use"),
            });
        }
        for sub in ["etc", "spool", "data", "mail"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io("creating directories"))?;
        }
        // The daemons run as postfix/nobody: every parent must be searchable.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(io("chmod"))?;
        run(Command::new("chown").arg("postfix").arg(dir.join("data")))
            .map_err(io("chown data"))?;
        run(Command::new("chown")
            .arg("nobody:nogroup")
            .arg(dir.join("mail")))
        .map_err(io("chown mail"))?;
        let d = dir.display();
        let main_cf = format!(
            "compatibility_level = 3.6
config_directory = {d}/etc
queue_directory  = {d}/spool
data_directory   = {d}/data
syslog_name      = {name}
maillog_file     = {d}/postfix.log
maillog_file_prefixes = {d}
enable_long_queue_ids = yes
myhostname = mta.test
myorigin   = localhost
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols  = ipv4
mynetworks      = 127.0.0.0/8
smtpd_tls_security_level = none
smtp_tls_security_level  = none
alias_maps =
alias_database =
biff = no
virtual_mailbox_domains = localhost
virtual_mailbox_base    = {d}/mail
virtual_mailbox_maps    = texthash:{d}/etc/vmailbox
virtual_uid_maps        = static:65534
virtual_gid_maps        = static:65534
smtpd_reject_unlisted_recipient = no
transport_maps    = texthash:{d}/etc/transport
default_transport = error:5.4.4 no route in test setup
relay_transport   = error:5.4.4 no route in test setup
in_flow_delay = 0
queue_run_delay      = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtp_connect_timeout = 2s
maximal_queue_lifetime = 0
bounce_queue_lifetime  = 0
default_process_limit = 100
"
        );
        let master_cf = format!(
            "127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
virtual   unix  - n n -  - virtual
local     unix  - n n -  - local
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"
        );
        std::fs::write(dir.join("etc/main.cf"), main_cf).map_err(io("writing main.cf"))?;
        std::fs::write(dir.join("etc/master.cf"), master_cf).map_err(io("writing master.cf"))?;
        let vmailbox = dir.join("etc/vmailbox");
        if !vmailbox.exists() {
            write_table(
                &vmailbox,
                "postmaster@localhost postmaster\nsender@localhost sender\n",
            )
            .map_err(io("writing vmailbox"))?;
        }
        write_table(
            &dir.join("etc/transport"),
            "defer.test smtp:[127.0.0.1]:1\nhardbounce.test error:5.1.1 mailbox does not exist\nsoftfail.test retry:4.2.0 try again later\n",
        )
        .map_err(io("writing transport"))?;
        // A restart of an existing dir skips the slow integrity checks.
        if dir.join("spool/pid").exists() {
            let _ = std::fs::write(dir.join("spool/quick-start"), b"");
        }
        let status = Command::new("postfix")
            .arg("-c")
            .arg(dir.join("etc"))
            .arg("start")
            .output()
            .map_err(io("running postfix start"))?;
        let mut inst = Instance {
            dir: dir.clone(),
            port,
            running: true,
        };
        if !status.status.success() {
            inst.running = false;
            return Err(Error::Start {
                dir,
                detail: format!("postfix start exited with {}", status.status),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !port_open(port) {
            if Instant::now() > deadline {
                return Err(Error::Start {
                    dir,
                    detail: format!("port {port} did not answer in 20 s"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(inst)
    }

    /// Replaces the deliverable addresses (`address` → mbox file name under `mail/`) and
    /// reloads Postfix. Addresses must be `@localhost`.
    pub fn set_mailboxes<'a>(
        &self,
        boxes: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), Error> {
        let io = |what: &'static str| {
            let dir = self.dir.clone();
            move |source| Error::Io { dir, what, source }
        };
        let mut text = String::from("postmaster@localhost postmaster\nsender@localhost sender\n");
        for (addr, mbox) in boxes {
            text.push_str(&format!("{addr} {mbox}\n"));
        }
        write_table(&self.dir.join("etc/vmailbox"), &text).map_err(io("writing vmailbox"))?;
        run(Command::new("postfix")
            .arg("-c")
            .arg(self.dir.join("etc"))
            .arg("reload"))
        .map_err(io("postfix reload"))?;
        Ok(())
    }

    /// SMTP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The instance directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The log file the bounces tailer follows.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postfix.log")
    }
    /// The mbox file of a mailbox name.
    pub fn mailbox(&self, name: &str) -> PathBuf {
        self.dir.join("mail").join(name)
    }

    /// Stops the instance and waits (up to 20 s) for its master to exit.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let pid = std::fs::read_to_string(self.dir.join("spool/pid/master.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.dir.join("etc"))
            .arg("stop")
            .output();
        if let Some(pid) = pid {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How far in the past a table's modification time is set: Postfix reads a `texthash:` file
/// whose mtime is within about 2 s of now as still being written and waits for it.
const COLD: Duration = Duration::from_secs(10);

/// Writes a lookup table so that Postfix can read it at once: the whole text into a new file
/// beside it, its modification time set [`COLD`] in the past, then renamed over `path`. The
/// rename is what Postfix's "hot file" wait protects against otherwise: a reader never sees
/// a half-written table.
pub fn write_table(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("new");
    let f = std::fs::File::create(&tmp)?;
    io::Write::write_all(&mut &f, text.as_bytes())?;
    f.set_modified(std::time::SystemTime::now() - COLD)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{:?} exited with {}: {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Message-IDs of the messages in an mbox file, in order (the `Message-ID:` header of each).
pub fn mbox_message_ids(path: &Path) -> io::Result<Vec<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut ids = Vec::new();
    let mut in_headers = false;
    for line in text.lines() {
        if line.starts_with("From ") {
            in_headers = true;
        } else if line.is_empty() {
            in_headers = false;
        } else if let (true, Some((name, value))) = (in_headers, line.split_once(':'))
            && name.eq_ignore_ascii_case("message-id")
        {
            ids.push(
                value
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_owned(),
            );
        }
    }
    Ok(ids)
}
