//! The CLI against a spoold with TLS and bearer tokens: the connection flags, env and files,
//! and the exit codes of each refusal.

mod common;

use common::{Broker, cmd};
use spool_testkit::hash_token;

const OPS: &str = "ops-token-0123456789abcdef";
const READER: &str = "reader-token-0123456789abcdef";
const WRITER: &str = "writer-token-0123456789abcdef";

/// TLS with a self-signed certificate for `localhost`; `OPS` may do anything, `READER` only
/// consume `public.*`, `WRITER` only produce to `public.*` (docs/operations.md's ACL example).
fn secured() -> (Broker, tempfile::TempDir) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("ca.pem"), ck.cert.pem()).unwrap();
    std::fs::write(files.path().join("ops.token"), format!("{OPS}\n")).unwrap();
    let broker = Broker::start_with_config(|dir| {
        std::fs::write(dir.join("server.crt"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), ck.signing_key.serialize_pem()).unwrap();
        Some(format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [[auth.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nadmin = [\"*\"]\nproduce = [\"*\"]\nconsume = [\"*\"]\ngroups = [\"*\"]\n\n\
             [[auth.tokens]]\nname = \"reader\"\nsha256 = \"{}\"\nconsume = [\"public.\"]\n\n\
             [[auth.tokens]]\nname = \"writer\"\nsha256 = \"{}\"\nproduce = [\"public.\"]\n",
            dir.join("server.crt").display(),
            dir.join("server.key").display(),
            hash_token(OPS),
            hash_token(READER),
            hash_token(WRITER),
        ))
    });
    (broker, files)
}

fn run(
    b: &Broker,
    files: &tempfile::TempDir,
    extra_env: &[(&str, &str)],
    args: &[&str],
) -> (i32, String, String) {
    let mut c = cmd(b, args);
    c.env("SPOOL_BROKER", format!("localhost:{}", b.port()))
        .env("SPOOL_TLS_CA", files.path().join("ca.pem"));
    for (k, v) in extra_env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tls_and_tokens_from_flags_env_and_files() {
    let (b, files) = secured();
    let token_file = files.path().join("ops.token");
    let tf = token_file.to_str().unwrap();

    // The token from a file (its first line).
    let (code, _, err) = run(
        &b,
        &files,
        &[],
        &["--token-file", tf, "topic", "create", "public.prices"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(
        &b,
        &files,
        &[("SPOOL_TOKEN_FILE", tf)],
        &["produce", "public.prices", "a", "b"],
    );
    assert_eq!(code, 0, "{err}");
    // The reader token from the environment may consume, but not produce or administer.
    let (code, out, err) = run(
        &b,
        &files,
        &[("SPOOL_TOKEN", READER)],
        &["consume", "public.prices", "-e", "-q"],
    );
    assert_eq!((code, out.as_str()), (0, "a\nb\n"), "{err}");
    let (code, _, err) = run(
        &b,
        &files,
        &[("SPOOL_TOKEN", READER)],
        &["produce", "public.prices", "x"],
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("not authorized"), "{err}");
    let (code, _, _) = run(
        &b,
        &files,
        &[("SPOOL_TOKEN", READER)],
        &["topic", "delete", "public.prices"],
    );
    assert_eq!(code, 4);
    // A token that may only produce can produce (the producer describes the topic first:
    // produce rights imply describing), and may not read.
    let (code, out, err) = run(
        &b,
        &files,
        &[("SPOOL_TOKEN", WRITER)],
        &["produce", "public.prices", "-v", "c"],
    );
    assert_eq!((code, out.as_str()), (0, "public.prices/0@2\n"), "{err}");
    let (code, _, err) = run(
        &b,
        &files,
        &[("SPOOL_TOKEN", WRITER)],
        &["consume", "public.prices", "-e", "-q"],
    );
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("may not consume from \"public.prices\""),
        "{err}"
    );
    // Outside its prefix, the refusal names what describing needs, once.
    let (code, _, err) = run(
        &b,
        &files,
        &[("SPOOL_TOKEN", WRITER)],
        &["produce", "secret", "x"],
    );
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("may not describe \"secret\" (needs produce, consume or admin on it)"),
        "{err}"
    );
    assert_eq!(err.matches("not authorized").count(), 1, "said once: {err}");
    // No token, or a wrong one: refused (4), not "unreachable".
    let (code, _, err) = run(&b, &files, &[], &["topic", "list"]);
    assert_eq!(code, 4, "{err}");
    let (code, _, err) = run(
        &b,
        &files,
        &[("SPOOL_TOKEN", "wrong-token-000000000000")],
        &["topic", "list"],
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("not authenticated"), "{err}");
    // A flag beats the environment.
    let (code, _, err) = run(
        &b,
        &files,
        &[("SPOOL_TOKEN", READER)],
        &["--token", OPS, "topic", "list"],
    );
    assert_eq!(code, 0, "{err}");

    // Plaintext against a TLS broker fails to connect: 3.
    let out = cmd(&b, &["--token", OPS, "topic", "list"])
        .env("SPOOL_BROKER", format!("localhost:{}", b.port()))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
