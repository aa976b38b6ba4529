//! Database roles and their privileges, exactly as SPEC §5 lists them, run through a bounded
//! [`Session`].

use pgwarden_api::Verifiers;

use crate::nodes::sql::{Session, SqlError};
use crate::secrets;

/// Roles created by pgwarden itself, never given to users.
pub const REPLICATION_ROLE: &str = "pgwarden_replicator";
/// Rewinds a former primary on another host (`pg_rewind` reads the new primary's files through
/// four functions): it may log in only while a rewind runs, with a password made for it.
pub const REWIND_ROLE: &str = "pgwarden_rewinder";

/// Valid names: lower-case letters, digits and `_`, starting with a letter, at most 63 bytes,
/// and not reserved.
pub fn valid_user_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
        && !name.starts_with("pg_")
        && !matches!(name, "postgres" | "public" | REPLICATION_ROLE | REWIND_ROLE)
}

pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The statements that give `user` its privileges on `database`, whose tables `owner` creates.
pub fn grants(user: &str, owner: &str, database: &str, read_only: bool) -> Vec<String> {
    let (u, o, d) = (ident(user), ident(owner), ident(database));
    if read_only {
        vec![
            format!("GRANT USAGE ON SCHEMA public TO {u}"),
            format!("GRANT CONNECT ON DATABASE {d} TO {u}"),
            format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {u}"),
            format!("GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {u}"),
            format!("ALTER DEFAULT PRIVILEGES FOR USER {o} IN SCHEMA public GRANT SELECT ON TABLES TO {u}"),
            format!("ALTER DEFAULT PRIVILEGES FOR USER {o} IN SCHEMA public GRANT SELECT ON SEQUENCES TO {u}"),
        ]
    } else {
        vec![
            format!("GRANT CREATE ON SCHEMA public TO {u}"),
            format!("GRANT ALL PRIVILEGES ON DATABASE {d} TO {u}"),
            format!("GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA public TO {u}"),
            format!("GRANT ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA public TO {u}"),
            format!("ALTER DEFAULT PRIVILEGES FOR USER {o} IN SCHEMA public GRANT ALL ON TABLES TO {u}"),
            format!("ALTER DEFAULT PRIVILEGES FOR USER {o} IN SCHEMA public GRANT ALL ON SEQUENCES TO {u}"),
        ]
    }
}

/// The password verifiers of the roles clients may log in as (not superusers, not the
/// replication role), as the node's catalog holds them: SCRAM verifiers, or an MD5 hash for a
/// role whose password was set that way.
pub async fn verifiers(admin: &Session) -> Result<Verifiers, SqlError> {
    let rows = admin
        .query(
            "SELECT rolname::text, rolpassword FROM pg_authid \
             WHERE rolcanlogin AND rolpassword IS NOT NULL AND NOT rolsuper AND NOT rolreplication",
            &[],
        )
        .await?;
    Ok(Verifiers(rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
}

/// Creates a login role with a SCRAM verifier of `password` (the password itself never reaches
/// the node).
pub async fn create_role(
    admin: &Session,
    user: &str,
    password: &str,
    extra: &str,
) -> Result<(), SqlError> {
    let sql = format!(
        "CREATE ROLE {} LOGIN {extra} PASSWORD {}",
        ident(user),
        literal(&secrets::scram_verifier(password))
    );
    admin.batch_execute(&sql).await
}

pub async fn set_password(admin: &Session, user: &str, password: &str) -> Result<(), SqlError> {
    let sql = format!(
        "ALTER ROLE {} PASSWORD {}",
        ident(user),
        literal(&secrets::scram_verifier(password))
    );
    admin.batch_execute(&sql).await
}

pub async fn create_database(admin: &Session, database: &str, owner: &str) -> Result<(), SqlError> {
    admin
        .batch_execute(&format!("CREATE DATABASE {} OWNER {}", ident(database), ident(owner)))
        .await
}

/// Runs `grants` connected to the user's database.
pub async fn grant(
    db_admin: &Session,
    user: &str,
    owner: &str,
    database: &str,
    read_only: bool,
) -> Result<(), SqlError> {
    let sql = grants(user, owner, database, read_only).join(";\n");
    db_admin.batch_execute(&sql).await
}

/// Drops a user, handing whatever it owns to the owner.
pub async fn drop_user(db_admin: &Session, user: &str, owner: &str) -> Result<(), SqlError> {
    let (u, o) = (ident(user), ident(owner));
    db_admin
        .batch_execute(&format!("REASSIGN OWNED BY {u} TO {o}; DROP OWNED BY {u}; DROP ROLE {u}"))
        .await
}

/// Lets `REWIND_ROLE` log in with `password` (a SCRAM verifier of it) and run what pg_rewind
/// needs on the source, creating the role the first time.
pub async fn open_rewind_login(admin: &Session, password: &str) -> Result<(), SqlError> {
    let role = ident(REWIND_ROLE);
    let verifier = literal(&secrets::scram_verifier(password));
    admin
        .batch_execute(&format!(
            "DO $pgwarden$ BEGIN \
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {name}) THEN \
             CREATE ROLE {role} NOLOGIN; END IF; END $pgwarden$; \
             ALTER ROLE {role} LOGIN PASSWORD {verifier}; \
             GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean), \
             pg_catalog.pg_stat_file(text, boolean), pg_catalog.pg_read_binary_file(text), \
             pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO {role}",
            name = literal(REWIND_ROLE),
        ))
        .await
}

/// Ends what `open_rewind_login` allowed: no login, no password.
pub async fn close_rewind_login(admin: &Session) -> Result<(), SqlError> {
    let role = ident(REWIND_ROLE);
    admin.batch_execute(&format!("ALTER ROLE {role} NOLOGIN PASSWORD NULL")).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_grants_are_the_six_of_the_spec() {
        let g = grants("bob", "app_1", "app_1", false);
        assert_eq!(g.len(), 6);
        assert_eq!(g[0], "GRANT CREATE ON SCHEMA public TO \"bob\"");
        assert_eq!(
            g[4],
            "ALTER DEFAULT PRIVILEGES FOR USER \"app_1\" IN SCHEMA public GRANT ALL ON TABLES TO \"bob\""
        );
        let r = grants("ro", "app_1", "app_1", true);
        assert!(r.iter().all(|s| !s.contains("ALL PRIVILEGES") && !s.contains("CREATE")));
    }

    #[test]
    fn user_names_are_checked() {
        assert!(valid_user_name("report_reader"));
        for bad in
            ["", "1abc", "Abc", "a-b", "postgres", "pg_monitor", "pgwarden_replicator", "a\"b"]
        {
            assert!(!valid_user_name(bad), "{bad}");
        }
    }
}
