//! # karibche — a secure data-exchange gateway between state agencies
//!
//! Ministries ask each other, and above all the central register of
//! foreigners, for records about non-citizens. Every request crosses this
//! gateway, which:
//!
//! 1. knows which **agency** asks, from its TLS client certificate ([`tls`],
//!    [`identity`], revocation in [`crl`]);
//! 2. knows which **officer** asks and **why**, from a JWT signed by the agency
//!    ([`token`], the agencies' keys in [`keys`]);
//! 3. decides from the **policy files** administrators edit ([`policy`],
//!    reloaded without restart by [`reload`]);
//! 4. holds everyone to **quotas** and keeps providers from overload
//!    ([`limits`], [`breaker`]);
//! 5. checks the data subject's **consent** where a grant needs it ([`consent`]);
//! 6. forwards to the **provider** and releases only the granted fields, some
//!    only pseudonymised or coarsened ([`proxy`], [`minimise`], [`transform`]),
//!    with cursors sealed ([`cursor`]) and no lookup that would link a
//!    pseudonym to a person ([`pseudonymity`]);
//! 7. commits a tamper-evident **audit record** before any data leaves, and
//!    for a change the record of its attempt before it is made ([`audit`]);
//!    auditors read the log over the gateway itself ([`audit_api`]).
//!
//! The built-in register of foreigners ([`registry`]) is a provider like any
//! other, on its own TLS listener. [`admin`] serves health and metrics;
//! [`store`] holds the database (SQLite by default, PostgreSQL for replicas);
//! [`pki`] makes the development certificates and [`credentials`] reloads
//! certificates, CRLs and keys when their files change.
//! [`serve`](crate::server::serve) runs all of it; the `karibche` binary only
//! parses its command line and calls into this library.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod config;
pub mod consent;
pub mod devpki;
pub mod files;
pub mod gateway;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod problem;
pub mod query;
pub mod registry;
pub mod runtime;
pub mod store;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;
