//! Rendering notifications: e-mail (subject, text, HTML) from templates, and the JSON bodies
//! of webhook and push calls.
//!
//! Templates are minijinja (Jinja2 syntax), loaded at run time: the built-in set
//! (`processors/pipeline/templates/`, compiled in) or a directory that overrides any of them,
//! so the people who own the e-mails change them without a rebuild. Names ending in `.html`
//! are **auto-escaped** (a product named `<script>` arrives as `&lt;script&gt;`); `.txt`
//! templates are not. Undefined variables are errors (a typo fails loudly, in tests, instead of
//! sending a blank). Subjects are folded to one line (no header injection).
//!
//! Why minijinja rather than askama: askama compiles templates into the binary (type-checked,
//! but every wording change is a release); minijinja keeps Jinja's syntax, escapes by file
//! name, has a small dependency tree and is actively maintained.

use std::path::Path;

use minijinja::{Environment, UndefinedBehavior, context};
use serde::Serialize;

use crate::events::{BasisPoints, Cents, NotificationKind, NotificationRequest};

const BUILTIN: &[(&str, &str)] = &[
    (
        "deal_alert.subject.txt",
        include_str!("../templates/deal_alert.subject.txt"),
    ),
    (
        "deal_alert.txt",
        include_str!("../templates/deal_alert.txt"),
    ),
    (
        "deal_alert.html",
        include_str!("../templates/deal_alert.html"),
    ),
    (
        "campaign.subject.txt",
        include_str!("../templates/campaign.subject.txt"),
    ),
    ("campaign.txt", include_str!("../templates/campaign.txt")),
    ("campaign.html", include_str!("../templates/campaign.html")),
];

/// A rendering failure (a template error or a request missing its deal/campaign).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The template failed (syntax, undefined variable).
    #[error("template {name}: {source}")]
    Template {
        /// Template name.
        name: String,
        /// The error.
        #[source]
        source: minijinja::Error,
    },
    /// Reading an override directory failed.
    #[error("templates dir {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The request lacks what its kind needs.
    #[error("notification {0}: {1}")]
    Incomplete(String, &'static str),
}

/// A rendered e-mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    /// One-line subject.
    pub subject: String,
    /// Plain text body.
    pub text: String,
    /// HTML body.
    pub html: String,
}

/// `1234` → `"12.34"`.
pub fn money(cents: Cents) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// `2_550` → `"25.5"` (one decimal, truncated).
pub fn percent(bp: BasisPoints) -> String {
    format!("{}.{}", bp / 100, (bp % 100) / 10)
}

#[derive(Serialize)]
struct DealView {
    name: String,
    category: String,
    merchant: String,
    price: String,
    reference: String,
    drop: String,
    url: String,
}

/// Templates plus the site's URLs.
#[derive(Debug)]
pub struct Renderer {
    env: Environment<'static>,
    site: String,
}

impl Renderer {
    /// The built-in templates; links point into `site` (`https://www.bestprice.example`).
    pub fn builtin(site: &str) -> Renderer {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        for (name, src) in BUILTIN {
            env.add_template(name, src)
                .expect("built-in templates parse (tested)");
        }
        Renderer {
            env,
            site: site.trim_end_matches('/').to_owned(),
        }
    }

    /// The built-in templates, with any file of the same name in `dir` replacing its built-in.
    pub fn with_overrides(site: &str, dir: &Path) -> Result<Renderer, RenderError> {
        let mut r = Renderer::builtin(site);
        for (name, _) in BUILTIN {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(src) => r
                    .env
                    .add_template_owned(name.to_string(), src)
                    .map_err(|source| RenderError::Template {
                        name: name.to_string(),
                        source,
                    })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(RenderError::Io {
                        path: path.display().to_string(),
                        source,
                    });
                }
            }
        }
        Ok(r)
    }

    fn render(&self, name: &str, ctx: &minijinja::Value) -> Result<String, RenderError> {
        self.env
            .get_template(name)
            .and_then(|t| t.render(ctx))
            .map_err(|source| RenderError::Template {
                name: name.to_owned(),
                source,
            })
    }

    fn context(
        &self,
        req: &NotificationRequest,
    ) -> Result<(minijinja::Value, &'static str), RenderError> {
        let settings_url = format!("{}/account/alerts", self.site);
        match req.kind {
            NotificationKind::DealAlert => {
                let d = req.deal.as_ref().ok_or_else(|| {
                    RenderError::Incomplete(req.id.clone(), "a deal alert without its deal")
                })?;
                let deal = DealView {
                    name: d.name.clone(),
                    category: d.category.clone(),
                    merchant: d.merchant.clone(),
                    price: money(d.price),
                    reference: money(d.reference),
                    drop: percent(d.drop_bp),
                    url: self.product_url(&d.product),
                };
                Ok((
                    context! { user_name => req.user_name.clone(), deal => minijinja::value::Serde(&deal), settings_url => settings_url },
                    "deal_alert",
                ))
            }
            NotificationKind::Campaign => {
                let c = req.campaign.as_ref().ok_or_else(|| {
                    RenderError::Incomplete(
                        req.id.clone(),
                        "a campaign message without its campaign",
                    )
                })?;
                Ok((
                    context! { user_name => req.user_name.clone(), campaign => minijinja::value::Serde(c), settings_url => settings_url },
                    "campaign",
                ))
            }
        }
    }

    /// The e-mail for a request.
    pub fn email(&self, req: &NotificationRequest) -> Result<Email, RenderError> {
        let (ctx, base) = self.context(req)?;
        let subject = self.render(&format!("{base}.subject.txt"), &ctx)?;
        let subject = subject.split_whitespace().collect::<Vec<_>>().join(" ");
        Ok(Email {
            subject,
            text: self.render(&format!("{base}.txt"), &ctx)?,
            html: self.render(&format!("{base}.html"), &ctx)?,
        })
    }

    /// The outgoing mail of an e-mail notification: rendered, with the mail id derived from
    /// the notification id.
    pub fn outgoing_mail(
        &self,
        req: &NotificationRequest,
    ) -> Result<crate::events::OutgoingMail, RenderError> {
        let e = self.email(req)?;
        Ok(crate::events::OutgoingMail {
            mail_id: crate::ids::mail_id(&req.id),
            notification: req.id.clone(),
            user: req.user.clone(),
            to: req.address.clone(),
            subject: e.subject,
            text: e.text,
            html: e.html,
            kind: req.kind,
            at_ms: req.at_ms,
        })
    }

    /// A Slack-style incoming-webhook body: `{"text": ...}` (the text e-mail's subject and link).
    /// The text is Slack mrkdwn: the subject (which carries the merchant's product name) and
    /// the link are escaped ([`slack_escape`]), so a name such as `<!channel>` or
    /// `<http://evil|Click>` is shown as written, not read as a mention or a link.
    pub fn webhook_body(
        &self,
        req: &NotificationRequest,
    ) -> Result<serde_json::Value, RenderError> {
        let e = self.email(req)?;
        let link = req
            .deal
            .as_ref()
            .map(|d| self.product_url(&d.product))
            .unwrap_or_default();
        let subject = slack_escape(&e.subject);
        Ok(serde_json::json!({
            "text": if link.is_empty() { subject } else { format!("{subject} <{}>", slack_escape(&link)) },
            "notification_id": req.id,
        }))
    }

    /// The product page: `<site>/p/<product id>`, the id percent-encoded (everything but
    /// RFC 3986's unreserved characters): an id from a merchant's feed is one path segment,
    /// whatever it holds (`/`, `?`, `#`; Slack's `|`, which would otherwise end the link's URL
    /// and turn the rest into the text shown for it).
    fn product_url(&self, product: &str) -> String {
        let mut url = format!("{}/p/", self.site);
        for b in product.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                url.push(char::from(b));
            } else {
                url.push_str(&format!("%{b:02X}"));
            }
        }
        url
    }

    /// A push-gateway body: id, title, body, link.
    pub fn push_body(&self, req: &NotificationRequest) -> Result<serde_json::Value, RenderError> {
        let e = self.email(req)?;
        let (body, url) = match &req.deal {
            Some(d) => (
                format!(
                    "{} at {} (was {})",
                    money(d.price),
                    d.merchant,
                    money(d.reference)
                ),
                self.product_url(&d.product),
            ),
            None => (
                req.campaign
                    .as_ref()
                    .map(|c| c.body.clone())
                    .unwrap_or_default(),
                self.site.clone(),
            ),
        };
        Ok(serde_json::json!({ "id": req.id, "title": e.subject, "body": body, "url": url }))
    }
}

/// Slack mrkdwn's escaping of text: `&`, `<` and `>` as `&amp;`, `&lt;` and `&gt;` (the three
/// characters Slack reads as control sequences: mentions, links, entities).
pub fn slack_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{CampaignInfo, Channel, DealInfo};

    fn req(name: &str) -> NotificationRequest {
        NotificationRequest {
            id: "n1".into(),
            kind: NotificationKind::DealAlert,
            user: "u1".into(),
            user_name: "Ann & <Bob>".into(),
            channel: Channel::Email,
            address: "u1@localhost".into(),
            time_zone: "UTC".into(),
            quiet_hours: None,
            deal: Some(DealInfo {
                transition: "p1:1".into(),
                product: "p1".into(),
                name: name.into(),
                category: "games".into(),
                price: 7_499,
                reference: 9_999,
                drop_bp: 2_499,
                merchant: "m1".into(),
            }),
            campaign: None,
            at_ms: 0,
        }
    }

    #[test]
    fn html_is_escaped_text_is_not() {
        let r = Renderer::builtin("https://bp.example/");
        let e = r
            .email(&req("<script>alert(1)</script> \"Deluxe\""))
            .unwrap();
        assert!(
            e.html
                .contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"),
            "{}",
            e.html
        );
        assert!(!e.html.contains("<script>"));
        assert!(e.html.contains("Ann &amp; &lt;Bob&gt;"));
        assert!(e.text.contains("<script>alert(1)</script> \"Deluxe\""));
        assert!(e.text.contains("Hi Ann & <Bob>,"));
        assert!(e.text.contains("dropped 24.9% to 74.99"));
        assert!(e.text.contains("usually costs 99.99"));
        assert!(e.text.contains("https://bp.example/p/p1"));
        assert_eq!(
            e.subject,
            "24.9% off: <script>alert(1)</script> \"Deluxe\" now 74.99"
        );
    }

    #[test]
    fn subjects_are_one_line() {
        let r = Renderer::builtin("https://bp.example");
        let e = r.email(&req("Evil\r\nBcc: all@example.com")).unwrap();
        assert!(!e.subject.contains('\n') && !e.subject.contains('\r'));
    }

    #[test]
    fn campaigns_and_bodies() {
        let r = Renderer::builtin("https://bp.example");
        let mut q = req("x");
        q.kind = NotificationKind::Campaign;
        q.deal = None;
        q.campaign = Some(CampaignInfo {
            id: "c1".into(),
            title: "Spring sale".into(),
            body: "50% & more".into(),
        });
        let e = r.email(&q).unwrap();
        assert_eq!(e.subject, "Spring sale");
        assert!(e.html.contains("50% &amp; more"));
        assert_eq!(r.push_body(&q).unwrap()["body"], "50% & more");
        let w = r.webhook_body(&req("Console")).unwrap();
        assert_eq!(
            w["text"],
            "24.9% off: Console now 74.99 <https://bp.example/p/p1>"
        );
        q.campaign = None;
        assert!(matches!(r.email(&q), Err(RenderError::Incomplete(..))));
    }

    /// A product name with Slack control sequences reaches the webhook as text.
    #[test]
    fn webhook_text_is_slack_escaped() {
        let r = Renderer::builtin("https://bp.example");
        let w = r
            .webhook_body(&req("<!channel> <http://evil.example|Free> & co"))
            .unwrap();
        assert_eq!(
            w["text"],
            "24.9% off: &lt;!channel&gt; &lt;http://evil.example|Free&gt; &amp; co now 74.99 \
             <https://bp.example/p/p1>"
        );
        assert_eq!(slack_escape("a&b<c>d"), "a&amp;b&lt;c&gt;d");
        // A product id from a feed cannot choose the link's text (`<url|text>`) or path.
        let mut q = req("Console");
        if let Some(d) = q.deal.as_mut() {
            d.product = "p1|Free money/../x?y#é".into();
        }
        let w = r.webhook_body(&q).unwrap();
        assert_eq!(
            w["text"],
            "24.9% off: Console now 74.99 \
             <https://bp.example/p/p1%7CFree%20money%2F..%2Fx%3Fy%23%C3%A9>"
        );
        assert_eq!(
            r.push_body(&q).unwrap()["url"],
            "https://bp.example/p/p1%7CFree%20money%2F..%2Fx%3Fy%23%C3%A9"
        );
    }

    #[test]
    fn overrides_and_strict_undefined() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("deal_alert.subject.txt"),
            "Deal: {{ deal.name | upper }}",
        )
        .unwrap();
        let r = Renderer::with_overrides("https://bp.example", d.path()).unwrap();
        assert_eq!(r.email(&req("tv")).unwrap().subject, "Deal: TV");
        std::fs::write(d.path().join("deal_alert.txt"), "{{ deal.nmae }}").unwrap();
        let r = Renderer::with_overrides("https://bp.example", d.path()).unwrap();
        let err = r.email(&req("tv")).unwrap_err();
        assert!(err.to_string().contains("deal_alert.txt"), "{err}");
    }

    #[test]
    fn money_and_percent() {
        assert_eq!(money(5), "0.05");
        assert_eq!(money(123_456), "1234.56");
        assert_eq!(percent(2_000), "20.0");
        assert_eq!(percent(2_599), "25.9");
    }
}
