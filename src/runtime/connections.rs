//! Per-agency connection caps: one agency cannot hold every connection slot.
//!
//! Admission by the listener, keyed by the agency the client certificate
//! names under the policy in force; a slot is freed when its connection's
//! [`ConnectionSlot`] is dropped.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::identity::PeerCert;
use crate::policy::Policy;

/// Caps the connections one agency holds open at once, so one agency cannot take every slot.
pub struct ConnectionCaps {
    per_agency: usize,
    policy: Arc<ArcSwap<Policy>>,
    open: Mutex<HashMap<String, usize>>,
}

impl fmt::Debug for ConnectionCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionCaps")
            .field("per_agency", &self.per_agency)
            .finish_non_exhaustive()
    }
}

/// One admitted connection; dropping it frees the agency's slot.
#[derive(Debug)]
pub struct ConnectionSlot {
    caps: Arc<ConnectionCaps>,
    agency: String,
}

impl ConnectionCaps {
    /// At most `per_agency` connections per agency, agencies named by the policy in force.
    pub fn new(per_agency: usize, policy: Arc<ArcSwap<Policy>>) -> Arc<ConnectionCaps> {
        Arc::new(ConnectionCaps {
            per_agency,
            policy,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for the connection of `client`, or the agency id when its connections are all taken.
    ///
    /// Certificates of no known agency share one cap (they are refused on every request anyway).
    pub fn admit(self: &Arc<Self>, client: Option<&PeerCert>) -> Result<ConnectionSlot, String> {
        let agency = client
            .and_then(|c| {
                self.policy
                    .load()
                    .agency_for_certificate(c)
                    .map(|a| a.id.clone())
            })
            .unwrap_or_default();
        let Ok(mut open) = self.open.lock() else {
            return Err(agency);
        };
        let n = open.entry(agency.clone()).or_default();
        if *n >= self.per_agency {
            return Err(agency);
        }
        *n += 1;
        Ok(ConnectionSlot {
            caps: self.clone(),
            agency,
        })
    }

    /// Connections the agency holds open now.
    pub fn open(&self, agency: &str) -> usize {
        self.open
            .lock()
            .map(|m| m.get(agency).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.caps.open.lock() {
            if let Some(n) = open.get_mut(&self.agency) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.agency);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::quota::tests::policy;

    #[test]
    fn connections_are_capped_per_agency() {
        let policy = Arc::new(ArcSwap::from_pointee(policy()));
        let caps = ConnectionCaps::new(2, policy);
        let cert = |agency: &str| PeerCert {
            uri_sans: vec![format!("urn:karibche:agency:{agency}")],
            sha256: "00".repeat(32),
            dns_sans: Vec::new(),
            subject: String::new(),
        };
        let a = caps.admit(Some(&cert("ssg"))).unwrap();
        let _b = caps.admit(Some(&cert("ssg"))).unwrap();
        assert_eq!(caps.admit(Some(&cert("ssg"))).unwrap_err(), "ssg");
        let _c = caps.admit(Some(&cert("psda"))).unwrap();
        drop(a);
        assert_eq!(caps.open("ssg"), 1);
        let _d = caps.admit(Some(&cert("ssg"))).unwrap();
    }
}
