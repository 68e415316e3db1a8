//! What to do about the AWS failures users hit most (the seed's troubleshooting section): no
//! credentials in the chain, and a refused `sts:AssumeRole` (which needs a trust policy on the
//! role, printed here). Endpoint timeouts and certificates relying on the legacy Common Name are
//! explained where they happen (`upstream`).

use crate::iam::IamError;

/// The trust policy `role_arn` needs so that the principal Sluice runs as may assume it.
pub fn trust_policy(external_id: Option<&str>) -> String {
    let mut stmt = serde_json::json!({
        "Effect": "Allow",
        "Principal": { "AWS": "<ARN of the principal Sluice runs as: aws sts get-caller-identity>" },
        "Action": "sts:AssumeRole",
    });
    if let Some(id) = external_id {
        stmt["Condition"] = serde_json::json!({ "StringEquals": { "sts:ExternalId": id } });
    }
    let doc = serde_json::json!({ "Version": "2012-10-17", "Statement": [stmt] });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// An IAM error with the steps that fix it; `external_id` is the one configured for the role.
pub fn explain_iam(e: &IamError, external_id: Option<&str>) -> String {
    match e {
        IamError::NoCredentials(msg) => format!(
            "no AWS credentials: {msg}. Sluice uses the standard chain: AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY, AWS_PROFILE with ~/.aws/credentials, web identity, or the instance's \
             role through IMDS (off when AWS_EC2_METADATA_DISABLED=true)"
        ),
        IamError::AssumeRole { role, message } if is_access_denied(message) => format!(
            "AccessDenied on sts:AssumeRole for {role}: {message}. The role's trust policy must allow Sluice's \
             principal (with the configured external_id, if any), e.g.:\n{}",
            trust_policy(external_id)
        ),
        other => other.to_string(),
    }
}

fn is_access_denied(message: &str) -> bool {
    message.contains("AccessDenied") || message.contains("not authorized to perform: sts:AssumeRole")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_policy_names_the_external_id() {
        let p: serde_json::Value = serde_json::from_str(&trust_policy(Some("abc"))).unwrap();
        assert_eq!(p["Statement"][0]["Condition"]["StringEquals"]["sts:ExternalId"], "abc");
        assert_eq!(p["Statement"][0]["Action"], "sts:AssumeRole");
        let p: serde_json::Value = serde_json::from_str(&trust_policy(None)).unwrap();
        assert!(p["Statement"][0].get("Condition").is_none());
    }

    #[test]
    fn access_denied_prints_the_trust_policy() {
        let e = IamError::AssumeRole { role: "arn:aws:iam::1:role/r".into(), message: "AccessDenied: no".into() };
        let text = explain_iam(&e, Some("ext-1"));
        assert!(text.contains("ext-1"), "{text}");
        assert!(text.contains("sts:AssumeRole") && text.contains("trust policy"), "{text}");
        let e = IamError::NoCredentials("no providers in chain provided credentials".into());
        assert!(explain_iam(&e, None).contains("AWS_ACCESS_KEY_ID"));
    }
}
