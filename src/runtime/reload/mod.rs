//! Reloading while the system runs: the policy files ([`policy`]) and the
//! identity material — TLS certificates, CAs, CRLs and token keys
//! ([`credentials`]). Each builds the new value completely, records it in
//! the audit log, then swaps it in whole; a broken file leaves the old value
//! in force.

pub mod credentials;
pub mod policy;

pub use policy::{spawn, ReloadError, ReloadOutcome, Reloader, Trigger};
