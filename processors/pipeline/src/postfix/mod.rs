//! Postfix: the log grammar ([`parse`]), what a message's lines mean for our mails
//! ([`tracker`]), following the log file across rotations and restarts ([`tail`]), and running a
//! self-contained local instance ([`instance`], the recipe in `shared/reference/postfix.md`).

pub mod instance;
pub mod parse;
pub mod tail;
pub mod tracker;
