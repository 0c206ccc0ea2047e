//! One order, RFC 8555's whole round: a new order for the names, each pending
//! authorization's HTTP-01 challenge answered (its token held in [`Tokens`] until the
//! CA has checked it), a new key and its signing request, the certificate chain.

use std::{sync::Arc, time::Duration};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewOrder, Order, OrderStatus,
    RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};

use super::{AcmeError, Tokens};

/// How long the CA gets to check the challenges, and then to issue.
const POLL_DEADLINE: Duration = Duration::from_secs(60);

/// A certificate obtained: its chain and its new key, both PEM.
pub struct Issued {
    /// Leaf first, then the CA's intermediates.
    pub chain_pem: String,
    /// PKCS#8.
    pub key_pem: String,
}

/// Orders a certificate for `domains` with `account`, answering the challenges
/// through `tokens`.
pub async fn obtain(
    account: &Account,
    domains: &[String],
    tokens: &Arc<Tokens>,
) -> Result<Issued, AcmeError> {
    let identifiers: Vec<Identifier> = domains.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;

    // Tokens are served from here until the order is ready, or abandoned.
    let mut held = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        let name = authorization.identifier().to_string();
        match authorization.status {
            AuthorizationStatus::Pending => {}
            // Already proven (a CA may reuse a recent authorization).
            AuthorizationStatus::Valid => continue,
            status => return Err(AcmeError::Authorization { name, status }),
        }
        let mut challenge = authorization
            .challenge(ChallengeType::Http01)
            .ok_or(AcmeError::NoHttpChallenge(name))?;
        let key_authorization = challenge.key_authorization().as_str().to_owned();
        held.push(tokens.hold(challenge.token.clone(), key_authorization));
        challenge.set_ready().await?;
    }

    let policy = RetryPolicy::new().timeout(POLL_DEADLINE);
    if order.poll_ready(&policy).await? != OrderStatus::Ready {
        return Err(AcmeError::Invalid(why_invalid(&mut order).await));
    }
    drop(held);

    let key = KeyPair::generate()?;
    let mut request = CertificateParams::new(domains.to_vec())?;
    request.distinguished_name = DistinguishedName::new();
    let csr = request.serialize_request(&key)?;
    order.finalize_csr(csr.der()).await?;
    let chain_pem = order.poll_certificate(&policy).await?;
    Ok(Issued {
        chain_pem,
        key_pem: key.serialize_pem(),
    })
}

/// What the CA said about the failed challenges of an invalid order.
async fn why_invalid(order: &mut Order) -> String {
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let name = authorization.identifier().to_string();
        if let Ok(state) = authorization.refresh().await {
            reasons.extend(
                state
                    .challenges
                    .iter()
                    .filter_map(|c| c.error.as_ref())
                    .map(|problem| format!("{name}: {problem}")),
            );
        }
    }
    if reasons.is_empty() {
        "no reason given".into()
    } else {
        reasons.join("; ")
    }
}
