//! The consent table (`consents`, migration 0007): reading and writing rows,
//! one code path for SQLite and PostgreSQL. Only [`super::Consents`] writes
//! through it, once a change's attempt is on record.

use time::Date;

use super::record::{format_date, Consent};
use crate::store::Store;

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    subject: String,
    agency: String,
    purpose: String,
    scope: Option<String>,
    given_at: String,
    valid_until: Option<String>,
    evidence_ref: Option<String>,
    recorded_at: String,
    recorded_by: String,
    revoked_at: Option<String>,
}

impl From<Row> for Consent {
    fn from(r: Row) -> Consent {
        Consent {
            id: r.id,
            subject: r.subject,
            agency: r.agency,
            purpose: r.purpose,
            scope: r
                .scope
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            given_at: r.given_at,
            valid_until: r.valid_until,
            evidence_ref: r.evidence_ref,
            recorded_at: r.recorded_at,
            recorded_by: r.recorded_by,
            revoked_at: r.revoked_at,
        }
    }
}

const COLUMNS: &str = "id, subject, agency, purpose, scope, given_at, valid_until, evidence_ref, \
                       recorded_at, recorded_by, revoked_at";

/// Consent records in the database; cheap to clone. Changes go through `crate::consent::Consents`, which audits them.
#[derive(Debug, Clone)]
pub struct ConsentStore {
    store: Store,
}

impl ConsentStore {
    /// Consent records in `store` (migrated by [`Store::connect`]).
    pub fn new(store: Store) -> Self {
        ConsentStore { store }
    }

    /// Writes a new consent, durably or not at all (`crate::store::WriteTx`).
    pub(crate) async fn insert(&self, c: &Consent) -> Result<(), sqlx::Error> {
        let scope = (!c.scope.is_empty()).then(|| c.scope.join(" "));
        let mut tx = self.store.begin_write().await?;
        sqlx::query(
            "INSERT INTO consents (id, subject, agency, purpose, scope, given_at, valid_until, \
             evidence_ref, recorded_at, recorded_by, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL)",
        )
        .bind(&c.id)
        .bind(&c.subject)
        .bind(&c.agency)
        .bind(&c.purpose)
        .bind(scope)
        .bind(&c.given_at)
        .bind(c.valid_until.as_deref())
        .bind(c.evidence_ref.as_deref())
        .bind(&c.recorded_at)
        .bind(&c.recorded_by)
        .execute(tx.conn())
        .await?;
        tx.commit().await
    }

    /// The consent with this id.
    pub async fn get(&self, id: &str) -> Result<Option<Consent>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM consents WHERE id = $1");
        let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(self.store.pool())
            .await?;
        Ok(row.map(Consent::from))
    }

    /// Every consent (of one subject, if given), oldest first.
    pub async fn list(&self, subject: Option<&str>) -> Result<Vec<Consent>, sqlx::Error> {
        let rows: Vec<Row> = match subject {
            Some(s) => {
                let sql = format!(
                    "SELECT {COLUMNS} FROM consents WHERE subject = $1 ORDER BY recorded_at, id"
                );
                sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(s)
                    .fetch_all(self.store.pool())
                    .await?
            }
            None => {
                let sql = format!("SELECT {COLUMNS} FROM consents ORDER BY recorded_at, id");
                sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .fetch_all(self.store.pool())
                    .await?
            }
        };
        Ok(rows.into_iter().map(Consent::from).collect())
    }

    /// The newest consent holding today for subject × agency × purpose on `provider/service`.
    pub async fn find_valid(
        &self,
        subject: &str,
        agency: &str,
        purpose: &str,
        service: &str,
        today: Date,
    ) -> Result<Option<Consent>, sqlx::Error> {
        // ISO dates compare as text, so expiry is filtered in SQL; scope in Rust.
        let sql = format!(
            "SELECT {COLUMNS} FROM consents WHERE subject = $1 AND agency = $2 AND purpose = $3 \
             AND revoked_at IS NULL AND (valid_until IS NULL OR valid_until >= $4) \
             ORDER BY recorded_at DESC, id DESC"
        );
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(subject)
            .bind(agency)
            .bind(purpose)
            .bind(format_date(today))
            .fetch_all(self.store.pool())
            .await?;
        Ok(rows
            .into_iter()
            .map(Consent::from)
            .find(|c| c.holds(today, service)))
    }

    /// Sets `revoked_at` if not yet set; false when it was already revoked or does not exist.
    pub(crate) async fn set_revoked(&self, id: &str, at: &str) -> Result<bool, sqlx::Error> {
        let mut tx = self.store.begin_write().await?;
        let done =
            sqlx::query("UPDATE consents SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .bind(at)
                .execute(tx.conn())
                .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }
}
