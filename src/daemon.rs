//! Start-up order and signals for `tillkeyd`.
//!
//! Everything that can be wrong with the configuration (the TOML, the policy files, the TLS
//! files, the token and PIN, the registry) is checked before a port is bound, so a daemon that
//! is listening is a daemon that can serve.

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::api::idempotency::Idempotency;
use crate::api::{self, AppState};
use crate::audit::{AuditKey, AuditLog};
use crate::backend::{self, OpenedDevice, Purpose, Settings};
use crate::config::{Config, ConfigError, LogFormat, Overrides};
use crate::device::Device;
use crate::keys::KeyType;
use crate::metrics::{Metrics, OutcomeLabel};
use crate::policy::{Policy, PolicyHandle};
use crate::registry::Registry;
use crate::retail::Retail;
use crate::service::status::STATUS_KEY;
use crate::service::{ensure_service_key, Service};

/// The HMAC key in the token that authenticates audit entries.
pub const AUDIT_KEY: &str = "tillkey/audit";

/// Name of the async workers (and of the blocking pool's threads), so `tillkey bench` and
/// `perf` can tell them from the device threads, the audit writer and a load generator's own
/// tokio threads.
pub const WORKER_THREAD: &str = crate::backend::ASYNC_WORKER_THREAD;

/// sysexits.h EX_USAGE / EX_CONFIG-style: the operator must fix the configuration.
const EXIT_CONFIG: u8 = 64;
/// The token, registry or a listener could not be brought up.
const EXIT_UNAVAILABLE: u8 = 69;

pub fn main(config_path: &Path, overrides: Overrides) -> ExitCode {
    let (config, settings) = match load(config_path, &overrides) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("tillkeyd: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(config.log_format);
    // A key service needs no privilege; as root, a bug would have all of it.
    if crate::systemd::effective_uid() == Some(0) && !config.allow_root {
        tracing::error!("refusing to run as root; run as a dedicated user (see systemd/) or set server.allow_root = true");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .thread_name(WORKER_THREAD)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let code = match runtime.block_on(run(config, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Startup::Config(e)) => {
            tracing::error!(error = %e, "invalid configuration; not starting");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Startup::Unavailable(e)) => {
            tracing::error!(error = %e, "cannot start");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    };
    crate::logging::flush();
    code
}

/// The configuration with its `[backend]` checked by the backend it names: all of it is
/// refused the same way (exit 64) before anything is bound or touched.
fn load(path: &Path, overrides: &Overrides) -> Result<(Config, Settings), ConfigError> {
    let config = Config::load(path, overrides)?;
    let settings = Settings::from_config(&config)?;
    Ok((config, settings))
}

enum Startup {
    Config(String),
    Unavailable(String),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TILLKEY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::logging::BatchedStderr::start());
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn run(config: Config, settings: Settings) -> Result<(), Startup> {
    // Files this process makes (the registry, its journal, the lock) are its own, whatever
    // umask the shell or service manager passed down.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let policy = Policy::load_dir(&config.policy_dir).map_err(Startup::Config)?;
    tracing::info!(
        files = policy.file_count(),
        grants = policy.grant_count(),
        "policy loaded"
    );
    let tls = crate::tls::server_config(&config.tls).map_err(Startup::Config)?;

    // A second daemon on a SQLite registry is refused before it touches the device.
    let claim = Registry::claim(&config.registry_url)
        .map_err(|e| Startup::Unavailable(format!("registry: {e}")))?;
    let device = open_device(settings).await?;
    let state = Arc::new(open_services(&config, &device, policy, tls, claim).await?);

    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| Startup::Unavailable(format!("cannot listen on {addr}: {e}")))
    };
    let api_listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;
    let api_addr = api_listener
        .local_addr()
        .map_err(|e| Startup::Unavailable(e.to_string()))?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|e| Startup::Unavailable(e.to_string()))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let scheduler = tokio::spawn(schedule(state.clone(), stop_rx.clone()));
    let feed = tokio::spawn(follow_changes(state.clone(), stop_rx.clone()));
    let drain = std::time::Duration::from_secs(config.drain_timeout);
    let api_task = tokio::spawn(api::serve_api(
        api_listener,
        state.clone(),
        stop_rx.clone(),
        drain,
    ));
    let admin_task = tokio::spawn(api::serve_admin(admin_listener, state.clone(), stop_rx));
    tracing::info!(api_addr = %api_addr, admin_addr = %admin_addr, "listening");
    crate::systemd::ready();
    if let Some(every) = crate::systemd::watchdog_interval() {
        // Pings come from the runtime that serves requests: a wedged runtime stops them.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                crate::systemd::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }

    let signal_err = |e: std::io::Error| Startup::Unavailable(format!("signal handler: {e}"));
    let mut hup = signal(SignalKind::hangup()).map_err(signal_err)?;
    let mut term = signal(SignalKind::terminate()).map_err(signal_err)?;
    let mut int = signal(SignalKind::interrupt()).map_err(signal_err)?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                crate::systemd::reloading();
                reload_policy(&state, &config.policy_dir);
                reload_tls(&state, &config.tls);
                crate::systemd::ready();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(
        drain_timeout_s = config.drain_timeout,
        "shutting down: no new connections, draining in-flight requests"
    );
    crate::systemd::stopping();
    let _ = stop_tx.send(true);
    let _ = api_task.await;
    let _ = admin_task.await;
    let _ = scheduler.await;
    let _ = feed.await;
    state.service.core.shutdown().await;
    // Unloads what a TPM would otherwise keep loaded after this process; nothing for PKCS#11.
    device.close();
    Ok(())
}

/// The backend behind its device gate, reported in the start log.
async fn open_device(settings: Settings) -> Result<Arc<Device>, Startup> {
    let opened = tokio::task::spawn_blocking(move || backend::open(settings, Purpose::Daemon))
        .await
        .map_err(|e| Startup::Unavailable(e.to_string()))?
        .map_err(Startup::Unavailable)?;
    let device = Arc::new(Device::start(opened.backend, opened.device.pool_size()));
    // Counted outside the log line: a disabled level would not evaluate its fields.
    let (waits, threads) = (device.waits_on_device(), device.threads());
    match &opened.device {
        OpenedDevice::Pkcs11 {
            token_label,
            sessions,
        } => tracing::info!(
            token = token_label.as_str(),
            sessions,
            calls_off_workers = waits,
            device_threads = threads,
            "pkcs11 token ready"
        ),
        OpenedDevice::Tpm { tcti, contexts } => tracing::info!(
            tcti = tcti.as_str(),
            contexts,
            device_threads = threads,
            "tpm ready"
        ),
    }
    Ok(device)
}

/// Registry, the service's own keys, the audit trail and every feature: what the API serves.
async fn open_services(
    config: &Config,
    device: &Arc<Device>,
    policy: Policy,
    tls: Arc<rustls::ServerConfig>,
    claim: Option<crate::registry::Claim>,
) -> Result<AppState, Startup> {
    let registry = Registry::open_claimed(&config.registry_url, claim, config.registry_schema)
        .await
        .map_err(|e| Startup::Unavailable(format!("registry: {e}")))?;
    tracing::info!(keys = registry.len(), "registry loaded");
    let audit_key = ensure_service_key(&registry, device, AUDIT_KEY, KeyType::HmacSha256)
        .await
        .map_err(|e| {
            Startup::Unavailable(format!(
                "audit key: {e} {}",
                e.internal_detail().unwrap_or("")
            ))
        })?;
    ensure_service_key(&registry, device, STATUS_KEY, KeyType::EcdsaP256)
        .await
        .map_err(|e| {
            Startup::Unavailable(format!(
                "status-list key: {e} {}",
                e.internal_detail().unwrap_or("")
            ))
        })?;
    let active = audit_key
        .active()
        .ok_or_else(|| Startup::Unavailable(format!("{AUDIT_KEY} has no active version")))?;
    let metrics = Metrics::new();
    let audit = AuditLog::start(
        registry.pool().clone(),
        registry.sqlite_file(),
        device.clone(),
        AuditKey {
            object: active.object.clone(),
            version: active.version,
        },
        metrics.audit.clone(),
    )
    .await
    .map_err(Startup::Unavailable)?;

    let service = Service::new(
        device.clone(),
        registry,
        PolicyHandle::new(policy),
        audit,
        config.approval_ttl,
    );
    let retail = Retail::new(service.core.clone(), config.tokens);
    let idempotency = Idempotency::new(service.core.pool().clone());
    Ok(AppState {
        service,
        retail,
        metrics,
        idempotency,
        max_body_bytes: config.max_body_bytes,
        tls: RwLock::new(tls),
    })
}

/// How often rotation periods, grace windows and usage counts are checked; durations of a few
/// seconds therefore work (and tests watch whole cycles).
const SCHEDULER_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// How often an instance on a shared database reads the other instances' changes: well inside
/// `registry::MAX_BEHIND`, so one slow poll does not stop it serving.
const FOLLOW_TICK: std::time::Duration = std::time::Duration::from_millis(200);

async fn follow_changes(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(FOLLOW_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => match state.service.core.catch_up().await {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("caught up with the other instances' changes again");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::error!(detail = e.internal_detail().unwrap_or(""), "cannot read the other instances' changes; key operations stop within a second");
                }
                Err(_) => {}
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// How often Idempotency-Keys past their retention are deleted: they only take space, so
/// rarely, on every instance (a delete another instance already did costs nothing).
const IDEMPOTENCY_EXPIRY_TICK: std::time::Duration = std::time::Duration::from_secs(60);

async fn schedule(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SCHEDULER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut expiry = tokio::time::interval(IDEMPOTENCY_EXPIRY_TICK);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => state.service.lifecycle.tick().await,
            _ = expiry.tick() => state.idempotency.expire().await,
            _ = shutdown.changed() => return,
        }
    }
}

/// SIGHUP: the server certificate and key, the client CA bundle and the CRL are read again;
/// if any of them does not load, the configuration in force stays and the log says why.
/// Established connections keep the session they have.
fn reload_tls(state: &AppState, files: &crate::config::TlsFiles) {
    let outcome = match crate::tls::server_config(files) {
        Ok(config) => {
            *state.tls.write().unwrap_or_else(|p| p.into_inner()) = config;
            tracing::info!("TLS certificate, client CA and CRL reloaded");
            "ok"
        }
        Err(e) => {
            tracing::error!(error = %e, "TLS reload refused; the previous certificates stay in force");
            "invalid"
        }
    };
    state
        .metrics
        .tls_reloads
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
}

/// SIGHUP: a valid new policy replaces the old one whole; an invalid one is refused and the old
/// one stays in force.
fn reload_policy(state: &AppState, dir: &Path) {
    let outcome = match Policy::load_dir(dir) {
        Ok(p) => {
            tracing::info!(
                files = p.file_count(),
                grants = p.grant_count(),
                "policy reloaded"
            );
            state.service.core.policy().replace(p);
            "ok"
        }
        Err(e) => {
            tracing::error!(error = %e, "policy reload refused; the previous policy stays in force");
            "invalid"
        }
    };
    state
        .metrics
        .policy_reloads
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
}
