//! The transforms a grant declares per field (`transforms = { id =
//! "pseudonymise" }`), as the policy parses them. Applying them is the
//! gateway's work (`crate::gateway::release::transform`); the declaration is
//! the policy's, so the policy never depends on the gateway.

use serde::Deserialize;

/// A transform a grant may apply to a released field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// Keyed hash, stable per agency and key period.
    Pseudonymise,
    /// Dates and times reduced to the year.
    YearOnly,
    /// Birth dates replaced by an age band.
    AgeBand,
}

impl Transform {
    /// The name used in policy files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Transform::Pseudonymise => "pseudonymise",
            Transform::YearOnly => "year_only",
            Transform::AgeBand => "age_band",
        }
    }
}

/// The transforms of one grant: field path segments → transform.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transforms(pub(crate) Vec<(Vec<String>, Transform)>);

impl Transforms {
    /// From dotted paths.
    pub fn new<S: AsRef<str>>(pairs: impl IntoIterator<Item = (S, Transform)>) -> Self {
        Transforms(
            pairs
                .into_iter()
                .map(|(p, t)| {
                    (
                        p.as_ref()
                            .split('.')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect(),
                        t,
                    )
                })
                .collect(),
        )
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any field is released only as a pseudonym: such a grant must not
    /// serve lookups that name a person (`crate::policy::pseudonymity`).
    pub fn pseudonymises(&self) -> bool {
        self.0.iter().any(|(_, t)| *t == Transform::Pseudonymise)
    }

    /// The (dotted path, transform) pairs.
    pub fn pairs(&self) -> impl Iterator<Item = (String, Transform)> + '_ {
        self.0.iter().map(|(p, t)| (p.join("."), *t))
    }
}
