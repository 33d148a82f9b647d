//! The deals pipeline of seed 000 (BestPrice's deal alerts) on Spool.
//!
//! ```text
//! feed ─► prices ─► deals ─► deal-transitions ─► matching ─► notification-requests ─► notifications ─► HTTP (webhook, push)
//!                                                  ▲   │                                 │
//!                           user-settings ─────────┤   └► timeline                       └► outgoing-mail ─► SMTP ─► Postfix
//!                           address-status ◄───────┘                                          mail-status ◄──┘          │ log
//!                                 ▲                                                                                     ▼
//!                                 └────────── bounces ◄── postfix-log ◄── tailer ◄───────────────────────── postfix.log
//! ```
//!
//! Modules hold the processors' logic as plain code (pure where it can be: time is passed
//! in), so each is tested against a model without a broker; `docs/pipeline.md` is the
//! catalogue of topics and events and the decisions behind the heuristics.
//!
//! | module | job |
//! | --- | --- |
//! | [`events`], [`topics`], [`ids`] | payloads, topic names and settings, deterministic ids |
//! | [`deals`] | the deal heuristic (a product's state machine) |
//! | [`matching`] | fan-out of deals to interested users; timeline adds/removes |
//! | [`render`] | e-mail, webhook and push bodies from templates |
//! | [`deliver`] | SMTP (lettre) and HTTP (reqwest) delivery, outcome classification |
//! | [`quiet`] | per-user quiet hours (DST-correct) |
//! | [`postfix`] | Postfix log grammar, the bounce tracker, the log tailer, a local instance |
//! | [`feed`] | the seeded price feed and users |
//! | [`campaign`], [`publish`] | marketing campaigns' requests; writing inputs to a broker |

pub mod campaign;
pub mod deals;
pub mod deliver;
pub mod events;
pub mod feed;
pub mod ids;
pub mod matching;
pub mod postfix;
pub mod processors;
pub mod publish;
pub mod quiet;
pub mod render;
pub mod topics;

/// Installs rustls' ring provider as the process default (once; a provider already installed
/// by someone else is kept). reqwest and lettre are built without a provider of their own.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
