-- Schema bookkeeping starts here; each concern adds its own migration.
CREATE TABLE IF NOT EXISTS karibche_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
