//! `tillkey db migrate|version`: the registry database's schema, for the operator who upgrades
//! a cluster (instances on PostgreSQL do not migrate at start unless told to).

use std::path::Path;

use crate::config::{Config, Overrides};
use crate::registry::{migrations, Registry};

fn url(config_path: &Path) -> Result<String, String> {
    Ok(Config::load(config_path, &Overrides::default())
        .map_err(|e| e.to_string())?
        .registry_url)
}

pub async fn migrate(config_path: &Path) -> Result<bool, String> {
    let done = Registry::migrate(&url(config_path)?)
        .await
        .map_err(|e| format!("registry: {e}"))?;
    if done.from == done.to {
        out!("schema already at version {}", done.to);
    } else {
        out!("schema migrated from version {} to {}", done.from, done.to);
    }
    Ok(true)
}

/// Exit 0 when the database is at this build's version, 1 otherwise.
pub async fn version(config_path: &Path) -> Result<bool, String> {
    let url = url(config_path)?;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url)
        .await
        .map_err(|e| format!("registry: {e}"))?;
    let v = migrations::version(&pool)
        .await
        .map_err(|e| format!("registry: {e}"))?;
    pool.close().await;
    out!(
        "schema version {v}; this tillkey uses {}",
        migrations::LATEST
    );
    Ok(v == migrations::LATEST)
}
