//! `karibche audit …`: verify, query, export, archive and report on the access
//! log, from the database or from an export file, offline.
//!
//! `verify` keeps exit codes a script can rely on: 0 intact, 1 tampered,
//! 2 could not check, 3 truncated or rolled back (shorter than, or different
//! from, a checkpoint a witness cosigned). `verify-proof`: 0 valid, 1 not, 2 unreadable.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};

use crate::config::Config;
use crate::policy::Policy;

/// Filters shared by `audit query` and `audit export`.
#[derive(Debug, Args, Clone)]
pub struct FilterArgs {
    /// Records naming this data subject (register id).
    #[arg(long)]
    pub subject: Option<String>,
    /// Records of this agency.
    #[arg(long)]
    pub agency: Option<String>,
    /// Records of this officer.
    #[arg(long)]
    pub officer: Option<String>,
    /// Records for this provider.
    #[arg(long)]
    pub provider: Option<String>,
    /// Records for this service (of any provider, unless --provider is given too).
    #[arg(long)]
    pub service: Option<String>,
    /// Records stating this purpose.
    #[arg(long)]
    pub purpose: Option<String>,
    /// allow or deny.
    #[arg(long, value_parser = ["allow", "deny"])]
    pub decision: Option<String>,
    /// At or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    /// Records of this gateway node.
    #[arg(long)]
    pub node: Option<String>,
    /// Only requests whose shadow decision (shadow = true grants) differs from the enforced one.
    #[arg(long)]
    pub shadow_diff: bool,
    /// At most this many records.
    #[arg(long)]
    pub limit: Option<i64>,
}

impl FilterArgs {
    fn to_filter(&self) -> crate::audit::Filter {
        crate::audit::Filter {
            subject: self.subject.clone(),
            agency: self.agency.clone(),
            officer: self.officer.clone(),
            provider: self.provider.clone(),
            service: self.service.clone(),
            purpose: self.purpose.clone(),
            decision: self.decision.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            node: self.node.clone(),
            shadow_diff: self.shadow_diff,
            limit: self.limit,
            hide_restricted_since: None,
        }
    }
}

/// `karibche audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute every node's hash chain and Merkle tree. Exit 0: intact; 1: tampered; 2: could not check; 3: truncated or rolled back.
    Verify {
        /// Only this node's chain.
        #[arg(long)]
        node: Option<String>,
        /// Start at this sequence number (its prev_hash is taken as given).
        #[arg(long, value_name = "SEQ", conflicts_with = "file")]
        from: Option<i64>,
        /// Trusted audit public key (hex, as printed by `audit pubkey`): every checkpoint must carry its signature.
        #[arg(long, value_name = "HEX")]
        pubkey: Option<String>,
        /// Verify an export (JSON lines from `audit export`) offline instead of the database.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// With --file: the checkpoints exported beside it (`audit export --checkpoints`).
        #[arg(long, value_name = "FILE", requires = "file")]
        checkpoints: Option<PathBuf>,
        /// Check against the latest checkpoint this witness cosigned (its base URL). Repeatable.
        #[arg(long, value_name = "URL", conflicts_with = "file")]
        witness: Vec<String>,
        /// Check against the configured witnesses' latest cosigned checkpoints (`[[audit.witnesses]]`).
        #[arg(long, conflicts_with = "file")]
        witnesses: bool,
        /// Check against a cosigned checkpoint kept elsewhere (a signed note, as a witness returns it). Repeatable.
        #[arg(long, value_name = "FILE", conflicts_with = "file")]
        witnessed: Vec<PathBuf>,
    },
    /// Write a self-contained evidence file for one record (docs/EVIDENCE.md).
    Prove {
        /// The record's id (`x-request-id`, or `record_id` in a report).
        #[arg(long, value_name = "ID")]
        record: String,
        /// The evidence file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Check an evidence file offline (no database). Exit 0: valid; 1: not valid; 2: unreadable.
    VerifyProof {
        /// The evidence file (`audit prove`).
        file: PathBuf,
        /// The response body the agency received: must be the one the record says was released.
        #[arg(long, value_name = "FILE")]
        body: Option<PathBuf>,
        /// Trusted log public key (hex, `audit pubkey`).
        #[arg(long, value_name = "HEX")]
        pubkey: Option<String>,
    },
    /// A data subject's access report: who asked for the person's record, when, why, and what they got.
    Report {
        /// The person's register id.
        #[arg(long)]
        subject: String,
        /// Plain words, or JSON for a portal.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
        /// Also write one evidence file per listed access into this directory (`<record id>.json`).
        #[arg(long, value_name = "DIR")]
        proofs: Option<PathBuf>,
    },
    /// Print this node's audit public key (hex Ed25519), for offline verification.
    Pubkey,
    /// Benchmark the group-commit writer against one transaction per record (on a scratch database).
    Bench {
        /// Records per configuration.
        #[arg(long, default_value_t = 20_000)]
        records: usize,
        /// Concurrent callers.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Scratch database [default: a temporary SQLite file]; never your real audit database.
        #[arg(long, value_name = "URL")]
        scratch_url: Option<String>,
    },
    /// List matching records: a table for people, or JSON lines for tools.
    Query {
        /// Filters.
        #[command(flatten)]
        filter: FilterArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = QueryFormat::Table)]
        format: QueryFormat,
    },
    /// Move records older than a time to an archive file (JSON lines + checkpoints) and out of the database.
    Archive {
        /// Archive every node's records before this time (RFC 3339).
        #[arg(long, value_name = "RFC3339")]
        before: String,
        /// The archive file (created; FILE.checkpoints is written beside it).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// A consistent copy of the live log that verifies (SQLite: VACUUM INTO; PostgreSQL: pg_dump).
    Backup {
        /// The copy (SQLite file, or pg_dump custom-format dump); never overwritten.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Write matching records as JSON lines.
    Export {
        /// Filters.
        #[command(flatten)]
        filter: FilterArgs,
        /// Output file [default: standard output].
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Also write the signed checkpoints, as JSON lines, to this file (for `audit verify --file`).
        #[arg(long, value_name = "FILE")]
        checkpoints: Option<PathBuf>,
    },
}

/// Output of `audit query`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum QueryFormat {
    /// Aligned columns, for people.
    Table,
    /// One JSON record per line (the export format), for tools.
    Jsonl,
}

/// Output of `audit report`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    /// Plain words.
    Text,
    /// One JSON document.
    Json,
}

/// Runs `karibche audit …`.
pub async fn run(config: &Config, cmd: &AuditCommand) -> anyhow::Result<ExitCode> {
    if let AuditCommand::Bench {
        records,
        concurrency,
        scratch_url,
    } = cmd
    {
        let dir = crate::files::ScratchDir::new()?;
        let url = scratch_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}/bench.db", dir.path().display()));
        let store = crate::store::Store::connect(&url).await?;
        outln!("audit writer benchmark on {url}");
        let report = crate::audit::bench::bench(&store, *records, *concurrency).await?;
        out!("{report}");
        store.close().await;
        return Ok(ExitCode::SUCCESS);
    }
    if let AuditCommand::VerifyProof { file, body, pubkey } = cmd {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let outcome =
            (|| Ok::<_, anyhow::Error>((read(file)?, body.as_ref().map(read).transpose()?)))();
        let (evidence, body) = match outcome {
            Ok(x) => x,
            Err(err) => {
                eprintln!("karibche: {err:#}");
                return Ok(ExitCode::from(2));
            }
        };
        return Ok(
            match crate::audit::evidence::verify(&evidence, body.as_deref(), pubkey.as_deref()) {
                Ok(v) => {
                    out!("VALID: {v}");
                    ExitCode::SUCCESS
                }
                Err(why) => {
                    outln!("NOT VALID: {why}");
                    ExitCode::from(1)
                }
            },
        );
    }
    if let AuditCommand::Verify {
        file,
        checkpoints,
        pubkey,
        node,
        from,
        witness,
        witnesses,
        witnessed,
    } = cmd
    {
        // Exit codes a script can rely on: 0 intact, 1 tampered, 2 could not check, 3 truncated or rolled back.
        let mut urls = witness.clone();
        if *witnesses {
            urls.extend(config.audit.witnesses.iter().map(|w| w.url.clone()));
        }
        let outcome = match file {
            Some(file) => {
                verify_file(file, checkpoints.as_ref(), pubkey.as_deref()).map(|ok| (ok, false))
            }
            None => {
                let sources = Witnessed {
                    urls: &urls,
                    files: witnessed,
                };
                verify_database(config, node.as_deref(), pubkey.as_deref(), *from, sources).await
            }
        };
        return Ok(match outcome {
            Ok((_, true)) => ExitCode::from(3),
            Ok((true, _)) => ExitCode::SUCCESS,
            Ok((false, _)) => ExitCode::from(1),
            Err(err) if super::is_broken_pipe(&err) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("karibche: could not verify the audit log: {err:#}");
                ExitCode::from(2)
            }
        });
    }
    let store = crate::store::Store::connect(&config.database_url()).await?;
    let code = match cmd {
        AuditCommand::Bench { .. }
        | AuditCommand::Verify { .. }
        | AuditCommand::VerifyProof { .. } => ExitCode::SUCCESS,
        AuditCommand::Archive { before, out } => {
            let path = config.audit_key_path();
            let key = if path.exists() {
                Some(crate::audit::AuditKey::load_or_create(&path)?)
            } else {
                None
            };
            let signer = key.as_ref().map(|k| (config.node.as_str(), k));
            let report = crate::audit::archive::archive(&store, before, out, signer).await?;
            out!("{report}");
            if report.archived.is_empty() {
                outln!("nothing archived");
            }
            ExitCode::SUCCESS
        }
        AuditCommand::Prove { record, out } => {
            let evidence =
                crate::audit::evidence::prove(&store, record, &witness_keys(config)).await?;
            write_evidence(out, &evidence)?;
            outln!(
                "wrote {}: record {} in the tree of {} records, {} cosignature(s)",
                out.display(),
                record,
                evidence.tree_size,
                evidence.witness_keys.len()
            );
            ExitCode::SUCCESS
        }
        AuditCommand::Report {
            subject,
            format,
            proofs,
        } => {
            // Names come from the policy in force; without it the report shows ids.
            let policy = Policy::load(&config.policies_dir).ok();
            let name_of = |kind: crate::audit::report::NameKind, id: &str| {
                let p = policy.as_ref()?;
                match kind {
                    crate::audit::report::NameKind::Agency => p.agency(id).map(|a| a.name.clone()),
                    crate::audit::report::NameKind::Purpose => {
                        p.purpose(id).map(|x| x.title.clone())
                    }
                }
            };
            let mut options = crate::audit::report::ReportOptions {
                restricted_delay: config.audit.restricted_report_delay,
                ..Default::default()
            };
            if let Some(p) = &policy {
                options.log_providers = crate::gateway::builtin::audit::log_providers(p);
            }
            let report =
                crate::audit::report::subject_report_with(&store, subject, &options, &name_of)
                    .await?;
            if let Some(dir) = proofs {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let keys = witness_keys(config);
                let mut written = 0;
                for access in &report.accesses {
                    let id = &access.record_id;
                    // Ids are the gateway's request ids; keep only what is safe in a file name.
                    let name: String = id
                        .chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || c == '-' {
                                c
                            } else {
                                '_'
                            }
                        })
                        .collect();
                    match crate::audit::evidence::prove(&store, id, &keys).await {
                        Ok(e) => {
                            write_evidence(&dir.join(format!("{name}.json")), &e)?;
                            written += 1;
                        }
                        Err(err) => eprintln!("karibche: no proof for record {id}: {err}"),
                    }
                }
                eprintln!("wrote {written} evidence file(s) to {}", dir.display());
            }
            match format {
                ReportFormat::Text => out!("{report}"),
                ReportFormat::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
            }
            ExitCode::SUCCESS
        }
        AuditCommand::Backup { out } => {
            let done = crate::audit::backup::backup(&store, &config.database_url(), out).await;
            match done.with_context(|| format!("backup to {} failed", out.display()))? {
                crate::audit::backup::BackupOutcome::Sqlite {
                    path,
                    bytes,
                    report,
                } => {
                    out!("{report}");
                    outln!("backup {} ({bytes} bytes) verifies", path.display());
                }
                crate::audit::backup::BackupOutcome::PgDump { path, command } => {
                    outln!("{command}\nwrote {}; restore it with pg_restore (README: Backup and restore)", path.display());
                }
                crate::audit::backup::BackupOutcome::PgDumpCommand { command } => {
                    bail!("PostgreSQL is backed up with pg_dump, which is not installed here; run:\n  {command}")
                }
            }
            ExitCode::SUCCESS
        }
        AuditCommand::Pubkey => {
            let path = config.audit_key_path();
            if !path.exists() {
                bail!(
                    "no audit key at {} yet: start the gateway once (or set audit.key)",
                    path.display()
                );
            }
            let key = crate::audit::AuditKey::load_or_create(&path)?;
            outln!("{}", key.public_hex());
            ExitCode::SUCCESS
        }
        AuditCommand::Query { filter, format } => {
            let records = crate::audit::query(&store, &filter.to_filter()).await?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            match format {
                QueryFormat::Table => {
                    crate::audit::query::write_table(&records, &mut out)?;
                    writeln!(out, "{} record(s)", records.len())?;
                }
                QueryFormat::Jsonl => {
                    for r in &records {
                        crate::audit::query::write_json_line(&mut out, r)?;
                    }
                }
            }
            out.flush()?;
            ExitCode::SUCCESS
        }
        AuditCommand::Export {
            filter,
            output,
            checkpoints,
        } => {
            if let Some(path) = checkpoints {
                let file = crate::files::create_private(path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                let mut w = std::io::BufWriter::new(file);
                let n = crate::audit::offline::export_checkpoints(
                    &store,
                    filter.node.as_deref(),
                    &mut w,
                )
                .await?;
                eprintln!("exported {n} checkpoint(s) to {}", path.display());
            }
            let n = match output {
                Some(path) => {
                    let file = crate::files::create_private(path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut w = std::io::BufWriter::new(file);
                    let n = crate::audit::export(&store, &filter.to_filter(), &mut w).await?;
                    w.flush()?;
                    n
                }
                None => {
                    let mut w = std::io::BufWriter::new(std::io::stdout().lock());
                    let n = crate::audit::export(&store, &filter.to_filter(), &mut w).await?;
                    w.flush()?;
                    n
                }
            };
            eprintln!("exported {n} record(s)");
            ExitCode::SUCCESS
        }
    };
    store.close().await;
    Ok(code)
}

/// `audit verify --file`: an export or archive, offline. `Ok(intact)`, or why it could not be checked.
fn verify_file(
    file: &std::path::Path,
    checkpoints: Option<&PathBuf>,
    pubkey: Option<&str>,
) -> anyhow::Result<bool> {
    let open = |p: &std::path::Path| {
        std::fs::File::open(p)
            .map(std::io::BufReader::new)
            .with_context(|| format!("cannot read {}", p.display()))
    };
    let cps = checkpoints.map(|p| open(p)).transpose()?;
    let report = crate::audit::offline::verify_export(open(file)?, cps, pubkey)?;
    out!("{report}");
    Ok(report.intact())
}

/// Where `audit verify` finds checkpoints kept outside the database.
struct Witnessed<'a> {
    /// Witnesses' base URLs.
    urls: &'a [String],
    /// Files holding a cosigned checkpoint each.
    files: &'a [PathBuf],
}

/// `audit verify` against the database. `Ok((intact, truncated or rolled
/// back))`, or why it could not be checked.
async fn verify_database(
    config: &Config,
    node: Option<&str>,
    pubkey: Option<&str>,
    from: Option<i64>,
    sources: Witnessed<'_>,
) -> anyhow::Result<(bool, bool)> {
    let mut notes = Vec::new();
    for f in sources.files {
        notes.push(
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
        );
    }
    let origin = config
        .audit
        .origin
        .clone()
        .unwrap_or_else(|| crate::audit::tree::default_origin(node.unwrap_or(&config.node)));
    for url in sources.urls {
        // A witness that cannot be asked leaves the question open: that is an error, not "intact".
        match crate::witness::client::fetch_latest(url, &origin).await {
            Ok(Some(note)) => notes.push(note),
            Ok(None) => eprintln!("karibche: witness {url} has cosigned nothing for {origin}"),
            Err(err) => bail!("cannot ask witness {err}"),
        }
    }
    let store = crate::store::Store::connect(&config.database_url()).await?;
    let report = crate::audit::chain::verify_witnessed(&store, node, pubkey, from, &notes).await;
    store.close().await;
    let report = report?;
    out!("{report}");
    if report.nodes.is_empty() {
        outln!("no audit records");
    }
    Ok((report.intact(), report.rolled_back()))
}

/// The configured witnesses' names and keys, for the evidence files.
fn witness_keys(config: &Config) -> Vec<(String, Vec<u8>)> {
    config
        .audit
        .witnesses
        .iter()
        .filter_map(|w| Some((w.name.clone(), hex::decode(&w.public_key).ok()?)))
        .collect()
}

/// Writes an evidence file (pretty JSON).
fn write_evidence(
    path: &std::path::Path,
    evidence: &crate::audit::evidence::Evidence,
) -> anyhow::Result<()> {
    let mut json = serde_json::to_vec_pretty(evidence)?;
    json.push(b'\n');
    crate::files::write_atomic(path, &json, 0o644)
        .with_context(|| format!("cannot write {}", path.display()))
}
