//! First-time set-up of a token for tillkey: `tillkey provision init`.
//!
//! Initialising wipes a token, so this only ever touches a slot whose token has never been
//! initialised, and only when the token the configuration names does not exist yet. Running it
//! against a token that is already there changes nothing; that makes the command safe to re-run
//! from automation.

use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::connection::{find_token, load_module};
use super::Pkcs11Settings;

/// What `initialise` found or did.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenInit {
    /// The configured token exists; nothing was changed.
    AlreadyThere { label: String },
    /// A blank slot now holds the configured token with the user PIN set.
    Initialised { label: String },
}

/// Make sure the configured token exists: initialise a blank slot with the label the token URI
/// names, the security officer PIN `so_pin` and the user PIN from the configuration.
pub fn initialise(
    settings: &Pkcs11Settings,
    so_pin: &Zeroizing<String>,
) -> Result<TokenInit, String> {
    let ctx = load_module(&settings.module)?;
    let outcome = initialise_with(&ctx, settings, so_pin);
    let _ = ctx.finalize();
    outcome
}

fn initialise_with(
    ctx: &cryptoki::context::Pkcs11,
    settings: &Pkcs11Settings,
    so_pin: &Zeroizing<String>,
) -> Result<TokenInit, String> {
    if let Ok((_, label)) = find_token(ctx, settings) {
        return Ok(TokenInit::AlreadyThere { label });
    }
    let label = settings.token.label.clone().ok_or_else(|| {
        format!(
            "{} names no label (token=...); a new token needs one",
            settings.token_uri
        )
    })?;
    if settings.token.serial.is_some() {
        return Err(format!(
            "{} names a serial number; the device assigns serials, so name the new token by label only",
            settings.token_uri
        ));
    }
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| format!("listing slots: {e}"))?;
    let blank = slots
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| !i.token_initialized())
                .unwrap_or(false)
        })
        .ok_or_else(|| {
            format!(
                "no token matches {} and module {} has no blank slot to initialise",
                settings.token_uri,
                settings.module.display()
            )
        })?;
    let so = AuthPin::from(so_pin.as_str().to_owned());
    ctx.init_token(blank, &so, &label)
        .map_err(|e| format!("C_InitToken '{label}': {e}"))?;
    // Some modules (SoftHSM among them) move a freshly initialised token to a new slot id, so
    // look it up again by its label before setting the user PIN.
    let (slot, label) = find_token(ctx, settings)?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| format!("session on new token '{label}': {e}"))?;
    session
        .login(UserType::So, Some(&so))
        .map_err(|e| format!("security officer login to '{label}': {e}"))?;
    session
        .init_pin(&AuthPin::from(settings.pin.as_str().to_owned()))
        .map_err(|e| format!("setting the user PIN of '{label}': {e}"))?;
    let _ = session.logout();
    Ok(TokenInit::Initialised { label })
}
