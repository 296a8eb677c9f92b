//! RelStorage 4.x's PostgreSQL schema, in both layouts, written for zeors.
//!
//! Invariants:
//! - The tables, columns, keys, indexes, sequence, view, trigger and stored functions are
//!   the ones RelStorage 4.x creates on PostgreSQL (same names, types, signatures and
//!   meaning), so a database made here is one RelStorage opens and uses, with
//!   `create-schema` on or off, and a database RelStorage made is one zeors serves.
//! - zeors only ever *adds* what is missing, inside one transaction that holds an
//!   advisory lock of its own (two-int key space, never used by RelStorage), so two
//!   servers starting together cannot both create the same object; it never replaces a
//!   function RelStorage installed (RelStorage marks its functions with a checksum comment
//!   and reinstalls its own when that does not match ours, which is harmless).
//! - zeors itself does not call the stored functions: they exist for RelStorage clients
//!   that open the database with `create-schema false`. zeors takes the same locks with
//!   its own statements (see `commit`).

use tokio_postgres::{Client, GenericClient};

/// Which of RelStorage's two layouts a database has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `keep-history true`: `transaction`, `object_state` keyed by (zoid, tid),
    /// `current_object`.
    HistoryPreserving,
    /// `keep-history false`: one `object_state` row per object, no transaction table.
    HistoryFree,
}

impl Layout {
    pub fn from_keep_history(keep: bool) -> Layout {
        if keep {
            Layout::HistoryPreserving
        } else {
            Layout::HistoryFree
        }
    }

    pub fn keeps_history(self) -> bool {
        self == Layout::HistoryPreserving
    }

    /// The table that holds each object's current tid.
    pub fn current_table(self) -> &'static str {
        match self {
            Layout::HistoryPreserving => "current_object",
            Layout::HistoryFree => "object_state",
        }
    }
}

/// The advisory lock (two-int form, a key space RelStorage never uses) held while the
/// schema is checked and created: "zeor", 1.
const SCHEMA_LOCK: (i32, i32) = (0x7a65_6f72, 1);

/// Tables every layout needs, in creation order (foreign keys point backwards).
fn layout_tables(layout: Layout) -> &'static [(&'static str, &'static str)] {
    match layout {
        Layout::HistoryPreserving => HP_TABLES,
        Layout::HistoryFree => HF_TABLES,
    }
}

const HP_TABLES: &[(&str, &str)] = &[
    (
        "commit_row_lock",
        "CREATE TABLE commit_row_lock (tid BIGINT NOT NULL PRIMARY KEY);
         INSERT INTO commit_row_lock (tid) VALUES (0);",
    ),
    (
        "transaction",
        "CREATE TABLE \"transaction\" (
             tid          BIGINT  NOT NULL PRIMARY KEY,
             packed       BOOLEAN NOT NULL DEFAULT FALSE,
             is_empty     BOOLEAN NOT NULL DEFAULT FALSE,
             username     BYTEA   NOT NULL,
             description  BYTEA   NOT NULL,
             extension    BYTEA
         );
         -- tid 0 stands for \"no previous revision\" in object_state.prev_tid.
         INSERT INTO \"transaction\" (tid, username, description)
             VALUES (0, 'system'::bytea, 'special transaction for object creation'::bytea);",
    ),
    ("zoid_seq", "CREATE SEQUENCE IF NOT EXISTS zoid_seq;"),
    (
        "object_state",
        "CREATE TABLE object_state (
             zoid        BIGINT NOT NULL,
             tid         BIGINT NOT NULL REFERENCES \"transaction\",
             prev_tid    BIGINT NOT NULL REFERENCES \"transaction\",
             md5         CHAR(32),
             state_size  BIGINT NOT NULL,
             state       BYTEA,
             CONSTRAINT object_state_pk PRIMARY KEY (zoid, tid),
             CHECK (tid > 0),
             CHECK (state_size >= 0)
         );
         CREATE INDEX object_state_tid ON object_state (tid);
         CREATE INDEX object_state_prev_tid ON object_state (prev_tid);",
    ),
    (
        "blob_chunk",
        "CREATE TABLE blob_chunk (
             zoid       BIGINT NOT NULL,
             tid        BIGINT NOT NULL,
             chunk_num  BIGINT NOT NULL,
             chunk      OID    NOT NULL,
             CONSTRAINT blob_chunk_pk PRIMARY KEY (zoid, tid, chunk_num),
             CONSTRAINT blob_chunk_fk FOREIGN KEY (zoid, tid)
                 REFERENCES object_state (zoid, tid) ON DELETE CASCADE
         );
         CREATE INDEX blob_chunk_lookup ON blob_chunk (zoid, tid);",
    ),
    (
        "current_object",
        "CREATE TABLE current_object (
             zoid  BIGINT NOT NULL PRIMARY KEY,
             tid   BIGINT NOT NULL,
             FOREIGN KEY (zoid, tid) REFERENCES object_state (zoid, tid)
         );
         CREATE INDEX current_object_tid ON current_object (tid);",
    ),
    (
        "object_ref",
        "CREATE TABLE object_ref (
             zoid     BIGINT NOT NULL,
             tid      BIGINT NOT NULL,
             to_zoid  BIGINT NOT NULL,
             PRIMARY KEY (tid, zoid, to_zoid)
         );",
    ),
    (
        "object_refs_added",
        "CREATE TABLE object_refs_added (tid BIGINT NOT NULL PRIMARY KEY);",
    ),
    ("pack_object", PACK_OBJECT),
    (
        "pack_state",
        "CREATE TABLE pack_state (
             tid   BIGINT NOT NULL,
             zoid  BIGINT NOT NULL,
             PRIMARY KEY (tid, zoid)
         );",
    ),
    (
        "pack_state_tid",
        "CREATE TABLE pack_state_tid (tid BIGINT NOT NULL PRIMARY KEY);",
    ),
];

const PACK_OBJECT: &str = "CREATE TABLE pack_object (
         zoid      BIGINT  NOT NULL PRIMARY KEY,
         keep      BOOLEAN NOT NULL,
         keep_tid  BIGINT  NOT NULL,
         visited   BOOLEAN NOT NULL DEFAULT FALSE
     );
     CREATE INDEX pack_object_keep_false ON pack_object (zoid) WHERE keep = false;
     CREATE INDEX pack_object_keep_true ON pack_object (visited) WHERE keep = true;";

const HF_TABLES: &[(&str, &str)] = &[
    (
        "commit_row_lock",
        "CREATE TABLE commit_row_lock (tid BIGINT NOT NULL PRIMARY KEY);
         INSERT INTO commit_row_lock (tid) VALUES (0);",
    ),
    ("zoid_seq", "CREATE SEQUENCE IF NOT EXISTS zoid_seq;"),
    (
        "object_state",
        "CREATE TABLE object_state (
             zoid        BIGINT NOT NULL PRIMARY KEY,
             tid         BIGINT NOT NULL,
             state_size  BIGINT NOT NULL,
             state       BYTEA,
             CHECK (tid > 0),
             CHECK (state_size >= 0)
         );
         CREATE INDEX object_state_tid ON object_state (tid);",
    ),
    (
        "blob_chunk",
        "CREATE TABLE blob_chunk (
             zoid       BIGINT NOT NULL,
             chunk_num  BIGINT NOT NULL,
             tid        BIGINT NOT NULL,
             chunk      OID    NOT NULL,
             CONSTRAINT blob_chunk_pk PRIMARY KEY (zoid, chunk_num),
             CONSTRAINT blob_chunk_fk FOREIGN KEY (zoid)
                 REFERENCES object_state (zoid) ON DELETE CASCADE
         );
         CREATE INDEX blob_chunk_lookup ON blob_chunk (zoid);",
    ),
    (
        "object_ref",
        "CREATE TABLE object_ref (
             zoid     BIGINT NOT NULL,
             to_zoid  BIGINT NOT NULL,
             tid      BIGINT NOT NULL,
             PRIMARY KEY (zoid, to_zoid)
         );",
    ),
    (
        "object_refs_added",
        "CREATE TABLE object_refs_added (
             zoid  BIGINT NOT NULL PRIMARY KEY,
             tid   BIGINT NOT NULL
         );",
    ),
    ("pack_object", PACK_OBJECT),
];

/// The view RelStorage keeps in history-preserving databases.
const HP_VIEW: &str = "CREATE VIEW current_object_state AS
     SELECT zoid, tid, state
     FROM object_state JOIN current_object USING (zoid, tid);";

/// Stored functions, by name. `{cur}` is the table with the current tids, `{join}` the
/// join that reaches the current state and `{state}` the relation that holds it.
const COMMON_FUNCTIONS: &[(&str, &str)] = &[
    (
        "make_tid_for_epoch",
        r#"CREATE OR REPLACE FUNCTION make_tid_for_epoch(unix_ts double precision)
RETURNS BIGINT AS $zeors$
DECLARE
  t TIMESTAMP := timezone('UTC', to_timestamp(unix_ts));
  minutes BIGINT;
  secs double precision;
BEGIN
  -- ZODB's TimeStamp: minutes since 1900-01-01 in the high 32 bits (with 31-day
  -- months), seconds of the minute in units of 60 / 2**32 in the low ones, truncated.
  minutes := ((((EXTRACT(YEAR FROM t)::BIGINT - 1900) * 12 + EXTRACT(MONTH FROM t)::BIGINT - 1)
               * 31 + EXTRACT(DAY FROM t)::BIGINT - 1) * 24 + EXTRACT(HOUR FROM t)::BIGINT)
             * 60 + EXTRACT(MINUTE FROM t)::BIGINT;
  secs := unix_ts - floor(unix_ts / 60.0) * 60.0;
  RETURN (minutes << 32) + TRUNC(secs / 1.3969838619232178e-08::numeric)::BIGINT;
END;
$zeors$ LANGUAGE plpgsql IMMUTABLE;"#,
    ),
    (
        "make_current_tid",
        r#"CREATE OR REPLACE FUNCTION make_current_tid()
RETURNS BIGINT AS $zeors$
  SELECT make_tid_for_epoch(EXTRACT(EPOCH FROM clock_timestamp()));
$zeors$ LANGUAGE SQL STABLE STRICT PARALLEL SAFE;"#,
    ),
    (
        "blob_chunk_delete_trigger",
        r#"CREATE OR REPLACE FUNCTION blob_chunk_delete_trigger()
RETURNS TRIGGER AS $zeors$
DECLARE
  refs integer;
BEGIN
  -- The large object goes with the last row that refers to it.
  SELECT count(*) INTO refs FROM blob_chunk WHERE chunk = OLD.chunk;
  IF refs = 1 THEN
    PERFORM lo_unlink(OLD.chunk);
  END IF;
  RETURN OLD;
END;
$zeors$ LANGUAGE plpgsql;"#,
    ),
    (
        "temp_blob_chunk_delete_trigger",
        r#"CREATE OR REPLACE FUNCTION temp_blob_chunk_delete_trigger()
RETURNS TRIGGER AS $zeors$
DECLARE
  refs integer;
BEGIN
  -- A staged chunk replaced before commit: drop its large object unless committed.
  SELECT count(*) INTO refs FROM blob_chunk WHERE chunk = OLD.chunk;
  IF refs = 0 THEN
    PERFORM lo_unlink(OLD.chunk);
  END IF;
  RETURN OLD;
END;
$zeors$ LANGUAGE plpgsql;"#,
    ),
    (
        "merge_blob_chunks",
        r#"CREATE OR REPLACE FUNCTION merge_blob_chunks()
RETURNS VOID AS $zeors$
DECLARE
  r record;
  first_lo oid;
  dst integer;
  src integer;
  piece bytea;
BEGIN
  -- Older RelStorage versions split a blob over several rows; append every later
  -- chunk to chunk 0 of the same revision, then drop the later rows.
  FOR r IN SELECT zoid, tid, chunk_num, chunk FROM blob_chunk
           WHERE chunk_num > 0 ORDER BY zoid, tid, chunk_num LOOP
    SELECT chunk INTO STRICT first_lo FROM blob_chunk
      WHERE zoid = r.zoid AND tid = r.tid AND chunk_num = 0;
    dst := lo_open(first_lo, 131072);
    PERFORM lo_lseek(dst, 0, 2);
    src := lo_open(r.chunk, 262144);
    LOOP
      piece := loread(src, 65536);
      EXIT WHEN length(piece) = 0;
      PERFORM lowrite(dst, piece);
    END LOOP;
    PERFORM lo_close(src);
    PERFORM lo_close(dst);
  END LOOP;
  DELETE FROM blob_chunk WHERE chunk_num > 0;
END;
$zeors$ LANGUAGE plpgsql;"#,
    ),
    (
        "lock_objects_and_detect_conflicts",
        r#"CREATE OR REPLACE FUNCTION lock_objects_and_detect_conflicts(
  read_current_oids BIGINT[],
  read_current_tids BIGINT[]
)
RETURNS TABLE(zoid BIGINT, tid BIGINT, prev_tid BIGINT, committed_state BYTEA) AS $zeors$
BEGIN
  IF read_current_oids IS NOT NULL THEN
    -- A read-current object already changed: report it, take no lock.
    RETURN QUERY
      SELECT c.zoid, c.tid, NULL::BIGINT, NULL::BYTEA
      FROM {cur} c JOIN unnest(read_current_oids, read_current_tids) AS rc(zoid, tid)
        ON c.zoid = rc.zoid
      WHERE c.tid <> rc.tid
      LIMIT 1;
    IF FOUND THEN
      RETURN;
    END IF;
    -- Shared locks, in oid order, without waiting: an object locked for writing by
    -- another transaction is about to change.
    PERFORM 1 FROM (
      SELECT pg_try_advisory_xact_lock_shared(o) AS ok
      FROM (SELECT o FROM unnest(read_current_oids) AS o ORDER BY o) AS sorted
    ) AS attempts
    WHERE NOT attempts.ok
    LIMIT 1;
    IF FOUND THEN
      RAISE EXCEPTION USING ERRCODE = 'lock_not_available', HINT = 'readCurrent';
    END IF;
    -- Locked: check again; the exception also releases the locks.
    PERFORM 1
      FROM {cur} c JOIN unnest(read_current_oids, read_current_tids) AS rc(zoid, tid)
        ON c.zoid = rc.zoid
      WHERE c.tid <> rc.tid;
    IF FOUND THEN
      RAISE EXCEPTION USING ERRCODE = 'lock_not_available', HINT = 'readCurrent';
    END IF;
  END IF;

  -- Exclusive locks on the existing objects being changed, in oid order (waits up to
  -- the session's lock_timeout).
  PERFORM pg_advisory_xact_lock(c.zoid)
  FROM {cur} c JOIN temp_store t ON t.zoid = c.zoid
  WHERE t.prev_tid <> 0
  ORDER BY c.zoid;

  -- Stores based on another revision than the committed one.
  RETURN QUERY
    SELECT c.zoid, c.tid, t.prev_tid, {state}.state
    FROM {cur} c JOIN temp_store t ON t.zoid = c.zoid
    {join}
    WHERE t.prev_tid <> c.tid;
END;
$zeors$ LANGUAGE plpgsql;"#,
    ),
];

const HP_FUNCTIONS: &[(&str, &str)] = &[
    (
        "lock_and_choose_tid",
        r#"CREATE OR REPLACE FUNCTION lock_and_choose_tid(
  p_packed BOOLEAN,
  p_username BYTEA,
  p_description BYTEA,
  p_extension BYTEA
)
RETURNS BIGINT
SET lock_timeout = 500000
AS $zeors$
DECLARE
  last_tid BIGINT;
  new_tid BIGINT;
BEGIN
  -- The commit lock; held until the transaction ends.
  PERFORM pg_advisory_xact_lock(-1);
  SELECT COALESCE(MAX(tid), 0) INTO last_tid FROM "transaction";
  new_tid := GREATEST(make_current_tid(), last_tid + 1);
  INSERT INTO "transaction" (tid, packed, username, description, extension)
    VALUES (new_tid, p_packed, p_username, p_description, p_extension);
  RETURN new_tid;
END;
$zeors$ LANGUAGE plpgsql;"#,
    ),
    (
        "lock_and_choose_tid_and_move",
        r#"CREATE OR REPLACE FUNCTION lock_and_choose_tid_and_move(
  p_committing_tid BIGINT,
  p_commit BOOLEAN,
  p_username BYTEA,
  p_description BYTEA,
  p_extension BYTEA
)
RETURNS BIGINT AS $zeors$
BEGIN
  IF p_committing_tid IS NULL THEN
    p_committing_tid := lock_and_choose_tid(FALSE, p_username, p_description, p_extension);
  END IF;
  INSERT INTO object_state (zoid, tid, prev_tid, md5, state_size, state)
    SELECT zoid, p_committing_tid, prev_tid, md5, COALESCE(length(state), 0), state
    FROM temp_store;
  INSERT INTO blob_chunk (zoid, tid, chunk_num, chunk)
    SELECT zoid, p_committing_tid, chunk_num, chunk FROM temp_blob_chunk;
  INSERT INTO current_object (zoid, tid)
    SELECT zoid, tid FROM object_state WHERE tid = p_committing_tid
    ON CONFLICT (zoid) DO UPDATE SET tid = excluded.tid;
  RETURN p_committing_tid;
END;
$zeors$ LANGUAGE plpgsql;"#,
    ),
];

const HF_FUNCTIONS: &[(&str, &str)] = &[
    (
        "lock_and_choose_tid",
        r#"CREATE OR REPLACE FUNCTION lock_and_choose_tid()
RETURNS BIGINT
SET lock_timeout = 600000
AS $zeors$
DECLARE
  last_tid BIGINT;
BEGIN
  -- The commit lock; without it two commits could pick the same tid (nothing in a
  -- history-free database makes tids unique).
  PERFORM pg_advisory_xact_lock(-1);
  SELECT COALESCE(MAX(tid), 0) INTO last_tid FROM object_state;
  RETURN GREATEST(make_current_tid(), last_tid + 1);
END;
$zeors$ LANGUAGE plpgsql;"#,
    ),
    (
        "lock_and_choose_tid_and_move",
        r#"CREATE OR REPLACE FUNCTION lock_and_choose_tid_and_move(
  p_committing_tid BIGINT,
  p_commit BOOLEAN
)
RETURNS BIGINT AS $zeors$
BEGIN
  IF p_committing_tid IS NULL THEN
    p_committing_tid := lock_and_choose_tid();
  END IF;
  INSERT INTO object_state (zoid, tid, state_size, state)
    SELECT zoid, p_committing_tid, COALESCE(length(state), 0), state FROM temp_store
    ON CONFLICT (zoid) DO UPDATE
      SET tid = excluded.tid, state_size = excluded.state_size, state = excluded.state;
  DELETE FROM blob_chunk WHERE zoid IN (SELECT zoid FROM temp_store);
  INSERT INTO blob_chunk (zoid, tid, chunk_num, chunk)
    SELECT zoid, p_committing_tid, chunk_num, chunk FROM temp_blob_chunk;
  RETURN p_committing_tid;
END;
$zeors$ LANGUAGE plpgsql;"#,
    ),
];

const BLOB_TRIGGER: &str = "CREATE TRIGGER blob_chunk_delete
     BEFORE DELETE ON blob_chunk
     FOR EACH ROW EXECUTE PROCEDURE blob_chunk_delete_trigger();";

/// Why the schema cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{0}")]
    Mismatch(String),
    #[error("the database has no RelStorage schema and create-schema is off")]
    Missing,
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

fn function_source(layout: Layout, src: &str) -> String {
    let (cur, join, state) = match layout {
        Layout::HistoryPreserving => (
            "current_object",
            "JOIN object_state s ON s.zoid = c.zoid AND s.tid = c.tid",
            "s",
        ),
        Layout::HistoryFree => ("object_state", "", "c"),
    };
    src.replace("{cur}", cur)
        .replace("{join}", join)
        .replace("{state}", state)
}

async fn names(
    client: &impl GenericClient,
    sql: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(client
        .query(sql, &[])
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect())
}

/// The layout an existing database has, `None` if it has no RelStorage tables.
pub async fn detect(client: &impl GenericClient) -> Result<Option<Layout>, tokio_postgres::Error> {
    let tables = names(
        client,
        "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()",
    )
    .await?;
    let has = |t: &str| tables.iter().any(|n| n == t);
    Ok(if has("transaction") && has("current_object") {
        Some(Layout::HistoryPreserving)
    } else if has("object_state") {
        Some(Layout::HistoryFree)
    } else {
        None
    })
}

/// Checks the database against `layout` and, with `create`, adds whatever is missing.
/// Returns true when something was created.
pub async fn prepare(
    client: &mut Client,
    layout: Layout,
    create: bool,
) -> Result<bool, SchemaError> {
    let tx = client.transaction().await?;
    if create {
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            &[&SCHEMA_LOCK.0, &SCHEMA_LOCK.1],
        )
        .await?;
    }
    let existing = detect(&tx).await?;
    match (existing, layout) {
        (Some(Layout::HistoryFree), Layout::HistoryPreserving) => {
            return Err(SchemaError::Mismatch(
                "schema mismatch: keep-history is true but the database is history-free".into(),
            ))
        }
        (Some(Layout::HistoryPreserving), Layout::HistoryFree) => {
            return Err(SchemaError::Mismatch(
                "schema mismatch: keep-history is false but the database is history-preserving"
                    .into(),
            ))
        }
        (None, _) if !create => return Err(SchemaError::Missing),
        _ => {}
    }
    let tables = names(
        &tx,
        "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()",
    )
    .await?;
    let sequences = names(
        &tx,
        "SELECT relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE relkind = 'S' AND n.nspname = current_schema()",
    )
    .await?;
    if !create {
        let missing: Vec<&str> = layout_tables(layout)
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| !tables.iter().any(|t| t == n) && !sequences.iter().any(|s| s == n))
            .collect();
        tx.commit().await?;
        if !missing.is_empty() {
            return Err(SchemaError::Mismatch(format!(
                "the database lacks {} and create-schema is off",
                missing.join(", ")
            )));
        }
        return Ok(false);
    }
    let mut created = false;
    for (name, ddl) in layout_tables(layout) {
        let exists = tables.iter().any(|t| t == name) || sequences.iter().any(|s| s == name);
        if !exists {
            tx.batch_execute(ddl).await?;
            created = true;
        }
    }
    if layout == Layout::HistoryPreserving {
        let views = names(
            &tx,
            "SELECT relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE relkind = 'v' AND n.nspname = current_schema()",
        )
        .await?;
        if !views.iter().any(|v| v == "current_object_state") {
            tx.batch_execute(HP_VIEW).await?;
            created = true;
        }
    }
    let functions = names(
        &tx,
        "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = current_schema()",
    )
    .await?;
    let specific = match layout {
        Layout::HistoryPreserving => HP_FUNCTIONS,
        Layout::HistoryFree => HF_FUNCTIONS,
    };
    // Functions call each other; like RelStorage, skip body validation while creating.
    tx.batch_execute("SET LOCAL check_function_bodies = off")
        .await?;
    for (name, src) in COMMON_FUNCTIONS.iter().chain(specific) {
        if !functions.iter().any(|f| f == name) {
            tx.batch_execute(&function_source(layout, src)).await?;
            created = true;
        }
    }
    let triggers = names(&tx, "SELECT tgname::text FROM pg_trigger").await?;
    if !triggers.iter().any(|t| t == "blob_chunk_delete") {
        tx.batch_execute(BLOB_TRIGGER).await?;
        created = true;
    }
    tx.commit().await?;
    Ok(created)
}
