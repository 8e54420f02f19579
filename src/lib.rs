//! # karibche — a secure data-exchange gateway between state agencies
//!
//! Ministries ask each other, and above all the central register of
//! foreigners, for records about non-citizens. Every request crosses this
//! gateway, whose pipeline ([`gateway`], one file per step) runs in this
//! order:
//!
//! 1. **authn** — which agency asks, from its TLS client certificate, and
//!    which officer asks and why, from a JWT signed by the agency
//!    ([`identity`]: certificates, CRLs, agency keys, token verification);
//! 2. **route** and **authz** — the provider and service named by the path,
//!    and what the policy files administrators edit allow ([`policy`],
//!    reloaded without restart by [`runtime`]);
//! 3. **limit** — agency, officer and grant quotas ([`limits`]);
//! 4. **consent** — the data subject's consent where a grant needs it
//!    ([`consent`]);
//! 5. **forward** and **release** — the provider's answer, under its
//!    concurrency cap and circuit breaker, cut down to the granted fields,
//!    some pseudonymised or coarsened, cursors sealed;
//! 6. **audit** — a tamper-evident record committed before any data leaves,
//!    and for a change the record of its attempt before it is made
//!    ([`audit`]). The gateway's facts about a request become that record in
//!    one place (`gateway::exchange`), and every answer that is not data is
//!    one of `gateway::refusal`'s.
//!
//! The consent API and the auditors' API are built-in providers
//! (`gateway::builtin`). The register of foreigners ([`registry`]) is a
//! provider like any other, on its own listener and database.
//!
//! Around the pipeline: [`runtime`] wires it all together and runs the
//! listeners, housekeeping and reloads; [`admin`] serves health, readiness
//! and `/metrics` from the counters in [`metrics`]; [`store`] opens the
//! databases (SQLite by default, PostgreSQL for replicas) with one migration
//! set each; [`config`] holds every setting and its default; [`files`] reads
//! PEM files and keys, hashes, and writes private files atomically;
//! [`problem`] is the `application/problem+json` body and [`query`] reads
//! and writes query components strictly. [`devpki`] makes the
//! development certificates, keys and tokens and nothing else; [`bench`](mod@bench) is
//! the load generator; [`cli`] has one file per command, and the `karibche`
//! binary only parses its command line and calls [`cli::run`].
//! [`console`] is the web console for security officers and administrators,
//! whose pages read the log through the same pipeline as the auditors' API.
//! `docs/ARCHITECTURE.md` draws the rooms and says where to add a step, a
//! provider or a command.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod config;
pub mod consent;
pub mod console;
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
pub mod witness;
