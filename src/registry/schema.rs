//! The rule the database enforces on version states, and a daemon's claim on a SQLite file.

use super::RegistryError;

/// A version's state only moves forward (active, verify-only, retired, revoked, destroyed): the
/// database refuses anything else, so no writer, however stale its copy of a key, can turn a
/// revoked or destroyed version back into one that signs or verifies.
const STATE_RANK: &str = "(CASE {} WHEN 'active' THEN 0 WHEN 'verify-only' THEN 1 \
    WHEN 'retired' THEN 2 WHEN 'revoked' THEN 3 WHEN 'destroyed' THEN 4 ELSE -1 END)";
const FORWARD_ONLY: &str = "key version states only move forward \
    (active, verify-only, retired, revoked, destroyed)";

/// The statements that install [`STATE_RANK`]'s rule as a trigger. (The ranks are parenthesized:
/// PL/pgSQL would end an `IF` condition at the first `THEN` inside a bare `CASE`.)
pub(super) fn state_trigger(sqlite: bool) -> Vec<String> {
    let rank = |side: &str| STATE_RANK.replace("{}", &format!("{side}.state"));
    if sqlite {
        vec![format!(
            "CREATE TRIGGER IF NOT EXISTS key_versions_state_forward
             BEFORE UPDATE OF state ON key_versions
             WHEN {} < {}
             BEGIN SELECT RAISE(ABORT, '{FORWARD_ONLY}'); END",
            rank("NEW"),
            rank("OLD")
        )]
    } else {
        vec![
            format!(
                "CREATE OR REPLACE FUNCTION tillkey_state_forward() RETURNS trigger
                 LANGUAGE plpgsql AS $$ BEGIN
                 IF {} < {} THEN
                   RAISE EXCEPTION 'version % of key %: {FORWARD_ONLY}', OLD.version, OLD.name;
                 END IF;
                 RETURN NEW; END $$",
                rank("NEW"),
                rank("OLD")
            ),
            "CREATE OR REPLACE TRIGGER key_versions_state_forward
             BEFORE UPDATE OF state ON key_versions
             FOR EACH ROW EXECUTE FUNCTION tillkey_state_forward()"
                .to_owned(),
        ]
    }
}

/// An exclusive lock on `<file>.lock` beside the SQLite file, for as long as the returned file
/// stays open. The lock (flock) is independent of SQLite's own locks and goes with the process.
pub(super) fn claim(db: &std::path::Path) -> Result<std::fs::File, RegistryError> {
    let mut name = db.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let path = db.with_file_name(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| RegistryError::Load(format!("{}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(RegistryError::InUse(format!(
            "{} is in use by another tillkeyd (it holds {}): a SQLite registry serves one \
             process at a time; stop that one first, or run several instances on one \
             PostgreSQL database ([registry] url)",
            db.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(RegistryError::Load(format!(
            "locking {}: {e}",
            path.display()
        ))),
    }
}
