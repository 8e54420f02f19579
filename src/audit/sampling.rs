//! Sampling rate-limit refusals into the audit log.
//!
//! Every refused request is audited, but a flood of 429s must not fill the
//! log nor hold back the writer. Per key (agency, officer, provider, service)
//! [`RefusalLog`] lets the first refusal of each window be recorded one by
//! one and folds the rest of the window into one summary record (reason
//! [`RATE_LIMITED_SUMMARY`], path `summary:<count>`, up to 64 subjects) that
//! the caller writes when the window closes. The quotas themselves are
//! [`crate::limits`]'s; this room only decides what the log keeps of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Entry;

/// The reason code of a record standing for several refused requests.
pub const RATE_LIMITED_SUMMARY: &str = "rate_limited_summary";

/// Whether a rate-limited request gets its own audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sample {
    /// Write this refusal's record as usual.
    Record,
    /// Counted into the summary record with this id, written when the window closes.
    Summarised {
        /// The summary record's id (the response's `X-Request-Id`).
        summary_id: String,
    },
}

/// At most this many data subjects are named in one summary record.
const SUMMARY_SUBJECTS: usize = 64;

struct Window {
    opened: Instant,
    /// The record that will stand for this window's further refusals, once there is one.
    summary: Option<Entry>,
    count: u64,
}

impl Window {
    fn close(self) -> Option<Entry> {
        let mut summary = self.summary?;
        summary.path = format!("summary:{}", self.count);
        Some(summary)
    }
}

#[derive(Default)]
struct RefusalState {
    windows: HashMap<String, Window>,
    /// Summaries of windows closed by a later refusal, waiting to be written.
    ready: Vec<Entry>,
}

/// Aggregates rate-limit refusals for the audit log: per key (agency,
/// officer, provider, service) the first refusal of each window is recorded
/// one by one, the rest of the window is counted into one summary record.
pub struct RefusalLog {
    window: Duration,
    max_windows: usize,
    state: Mutex<RefusalState>,
    unrecorded: AtomicU64,
    summaries: AtomicU64,
}

impl RefusalLog {
    /// Windows of `window`; with more than `max_windows` keys flooding at once, refusals are recorded one by one.
    pub fn new(window: Duration, max_windows: usize) -> RefusalLog {
        RefusalLog {
            window,
            max_windows,
            state: Mutex::new(RefusalState::default()),
            unrecorded: AtomicU64::new(0),
            summaries: AtomicU64::new(0),
        }
    }

    /// Decides whether the refusal `entry` (complete but for its id) is recorded on its own.
    pub fn sample(&self, entry: &Entry, now: Instant) -> Sample {
        let key = [
            &entry.agency,
            &entry.officer,
            &entry.provider,
            &entry.service,
        ]
        .map(|s| s.as_deref().unwrap_or(""))
        .join("\n");
        let Ok(mut st) = self.state.lock() else {
            return Sample::Record;
        };
        if let Some(w) = st.windows.get_mut(&key) {
            if now.saturating_duration_since(w.opened) < self.window {
                w.count += 1;
                let summary = w.summary.get_or_insert_with(|| Entry {
                    id: uuid::Uuid::now_v7().to_string(),
                    reason: Some(RATE_LIMITED_SUMMARY.to_owned()),
                    subjects: Vec::new(),
                    ..entry.clone()
                });
                for s in &entry.subjects {
                    if summary.subjects.len() < SUMMARY_SUBJECTS && !summary.subjects.contains(s) {
                        summary.subjects.push(s.clone());
                    }
                }
                let summary_id = summary.id.clone();
                self.unrecorded.fetch_add(1, Ordering::Relaxed);
                return Sample::Summarised { summary_id };
            }
            if let Some(s) = st.windows.remove(&key).and_then(Window::close) {
                st.ready.push(s);
            }
        }
        if st.windows.len() < self.max_windows {
            st.windows.insert(
                key,
                Window {
                    opened: now,
                    summary: None,
                    count: 0,
                },
            );
        }
        Sample::Record
    }

    /// Summary records of windows closed by `now`; the caller writes them to the audit log.
    pub fn due(&self, now: Instant) -> Vec<Entry> {
        self.take(|w| now.saturating_duration_since(w.opened) >= self.window)
    }

    /// Every pending summary, open windows included (at shutdown).
    pub fn drain(&self) -> Vec<Entry> {
        self.take(|_| true)
    }

    fn take(&self, closed: impl Fn(&Window) -> bool) -> Vec<Entry> {
        let Ok(mut st) = self.state.lock() else {
            return Vec::new();
        };
        let mut out = std::mem::take(&mut st.ready);
        let keys: Vec<String> = st
            .windows
            .iter()
            .filter(|(_, w)| closed(w))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            if let Some(s) = st.windows.remove(&k).and_then(Window::close) {
                out.push(s);
            }
        }
        self.summaries
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        out
    }

    /// Refusals not written one by one (each counted in a summary record).
    pub fn unrecorded(&self) -> u64 {
        self.unrecorded.load(Ordering::Relaxed)
    }

    /// Summary records handed out for writing.
    pub fn summaries(&self) -> u64 {
        self.summaries.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::RATE_LIMITED;

    fn refusal(officer: &str, subject: &str) -> Entry {
        Entry {
            id: uuid::Uuid::now_v7().to_string(),
            agency: Some("ssg".into()),
            officer: Some(officer.into()),
            provider: Some("registry".into()),
            service: Some("persons".into()),
            method: "GET".into(),
            path: format!("/v1/registry/persons/{subject}"),
            subjects: vec![subject.into()],
            decision: "deny".into(),
            reason: Some(RATE_LIMITED.into()),
            status: 429,
            ..Entry::default()
        }
    }

    #[test]
    fn a_flood_is_recorded_once_per_window_plus_a_summary() {
        let log = RefusalLog::new(Duration::from_millis(100), 2);
        let t0 = Instant::now();
        assert_eq!(log.sample(&refusal("o1", "RF-1"), t0), Sample::Record);
        let Sample::Summarised { summary_id } = log.sample(&refusal("o1", "RF-2"), t0) else {
            panic!("second refusal in the window must be summarised")
        };
        for i in 0..10 {
            assert_eq!(
                log.sample(
                    &refusal("o1", &format!("RF-{i}")),
                    t0 + Duration::from_millis(50)
                ),
                Sample::Summarised {
                    summary_id: summary_id.clone()
                }
            );
        }
        // Another officer is another key.
        assert_eq!(log.sample(&refusal("o2", "RF-1"), t0), Sample::Record);
        assert!(log.due(t0 + Duration::from_millis(99)).is_empty());
        let due = log.due(t0 + Duration::from_millis(100));
        assert_eq!(due.len(), 1, "o2's window had nothing to summarise");
        let s = &due[0];
        assert_eq!(s.id, summary_id);
        assert_eq!(s.path, "summary:11");
        assert_eq!(s.reason.as_deref(), Some(RATE_LIMITED_SUMMARY));
        assert_eq!(
            s.subjects.len(),
            10,
            "RF-0..RF-9, each once: {:?}",
            s.subjects
        );
        assert_eq!(log.unrecorded(), 11);

        // Past the window the next refusal is recorded again; beyond max_windows keys, every one is.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(log.sample(&refusal("o1", "RF-1"), t1), Sample::Record);
        assert_eq!(log.sample(&refusal("o2", "RF-1"), t1), Sample::Record);
        assert_eq!(log.sample(&refusal("o3", "RF-1"), t1), Sample::Record);
        assert_eq!(log.sample(&refusal("o3", "RF-1"), t1), Sample::Record);
        assert!(matches!(
            log.sample(&refusal("o1", "RF-1"), t1),
            Sample::Summarised { .. }
        ));
        let rest = log.drain();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].path, "summary:1");
        assert_eq!(log.summaries(), 2);
    }
}
