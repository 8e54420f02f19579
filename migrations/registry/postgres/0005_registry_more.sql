-- The register, second part: nationalities as rows (search and statistics by
-- nationality), indexes for time-range searches, and uniqueness of the numbers
-- that agencies write, so a repeated or conflicting write is refused.
CREATE TABLE reg_person_nationalities (
    code      TEXT NOT NULL,
    person_id TEXT NOT NULL REFERENCES reg_persons (id),
    PRIMARY KEY (code, person_id)
);
CREATE INDEX reg_person_nationalities_person ON reg_person_nationalities (person_id);

-- Persons registered before this migration keep their comma-separated codes.
INSERT INTO reg_person_nationalities (code, person_id)
SELECT DISTINCT code, id FROM (
    SELECT id, unnest(string_to_array(nationalities, ',')) AS code FROM reg_persons
) AS s
WHERE code <> '';

CREATE INDEX reg_crossings_at ON reg_crossings (at, id);
CREATE UNIQUE INDEX reg_documents_state_number ON reg_documents (issuing_state, number);
CREATE UNIQUE INDEX reg_residence_permits_number ON reg_residence_permits (number);
CREATE UNIQUE INDEX reg_work_permits_number ON reg_work_permits (number);
CREATE UNIQUE INDEX reg_asylum_cases_number ON reg_asylum_cases (case_number);
