//! The network policy calls: pod records (the agent), labels and policies (operators), and
//! the records agents enforce from, with a long poll for the next change.

use std::time::Duration;

use podnet_proto::policy::{
    check_namespace, check_object_name, LabelChange, NetworkPolicy, PodRecord, PolicyState,
};
use serde_json::Value;

use crate::client::{Client, ClientError, CALL_TIMEOUT};

/// The service answers a long poll within 20 s; this leaves room for the answer.
const LONG_POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// `NS/NAME` or `NS`, checked so it is safe in a URL path.
fn object_path(namespace: &str, name: Option<&str>) -> Result<String, ClientError> {
    let bad = |reason: String| ClientError::BadName {
        name: match name {
            Some(n) => format!("{namespace}/{n}"),
            None => namespace.to_string(),
        },
        reason,
    };
    check_namespace(namespace).map_err(bad)?;
    match name {
        Some(n) => {
            check_object_name(n).map_err(bad)?;
            Ok(format!("{namespace}/{n}"))
        }
        None => Ok(namespace.to_string()),
    }
}

impl Client {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<Value, ClientError> {
        let url = self.url(path);
        let mut builder = self.request(method, &url).timeout(CALL_TIMEOUT);
        if let Some(body) = body {
            builder = builder.json(body);
        }
        let resp = self.send(&url, builder).await?;
        self.json(&url, resp).await
    }

    /// Every pod, namespace label and policy: `GET /v1/policy`. With `after`, the answer waits
    /// until the records are newer than that revision (or the service's long poll ends).
    pub async fn policy(&self, after: Option<u64>) -> Result<PolicyState, ClientError> {
        let (path, timeout) = match after {
            Some(rev) => (format!("/v1/policy?after={rev}"), LONG_POLL_TIMEOUT),
            None => ("/v1/policy".to_string(), CALL_TIMEOUT),
        };
        let url = self.url(&path);
        let builder = self.request(reqwest::Method::GET, &url).timeout(timeout);
        let resp = self.send(&url, builder).await?;
        self.json(&url, resp).await
    }

    /// Registers a pod this node runs: `PUT /v1/pods/{ns}/{name}`.
    pub async fn put_pod(&self, pod: &PodRecord) -> Result<Value, ClientError> {
        let path = object_path(&pod.namespace, Some(&pod.name))?;
        self.call(reqwest::Method::PUT, &format!("/v1/pods/{path}"), Some(pod))
            .await
    }

    /// Forgets a pod (no error if it is not registered): `DELETE /v1/pods/{ns}/{name}`.
    pub async fn delete_pod(&self, namespace: &str, name: &str) -> Result<Value, ClientError> {
        let path = object_path(namespace, Some(name))?;
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/pods/{path}"),
            None::<&()>,
        )
        .await
    }

    /// Changes a pod's labels: `PATCH /v1/pods/{ns}/{name}`.
    pub async fn label_pod(
        &self,
        namespace: &str,
        name: &str,
        change: &LabelChange,
    ) -> Result<Value, ClientError> {
        let path = object_path(namespace, Some(name))?;
        self.call(
            reqwest::Method::PATCH,
            &format!("/v1/pods/{path}"),
            Some(change),
        )
        .await
    }

    /// Changes a namespace's labels: `PATCH /v1/namespaces/{ns}`.
    pub async fn label_namespace(
        &self,
        namespace: &str,
        change: &LabelChange,
    ) -> Result<Value, ClientError> {
        let path = object_path(namespace, None)?;
        let path = format!("/v1/namespaces/{path}");
        self.call(reqwest::Method::PATCH, &path, Some(change)).await
    }

    /// Creates or replaces policies, all or none: `POST /v1/policies`.
    pub async fn apply_policies(&self, batch: &[NetworkPolicy]) -> Result<Value, ClientError> {
        self.call(reqwest::Method::POST, "/v1/policies", Some(&batch))
            .await
    }

    /// Deletes a policy: `DELETE /v1/policies/{ns}/{name}`.
    pub async fn delete_policy(&self, namespace: &str, name: &str) -> Result<Value, ClientError> {
        let path = object_path(namespace, Some(name))?;
        let path = format!("/v1/policies/{path}");
        self.call(reqwest::Method::DELETE, &path, None::<&()>).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_they_reach_a_url() {
        assert_eq!(object_path("x", Some("a.b")).unwrap(), "x/a.b");
        assert_eq!(object_path("x", None).unwrap(), "x");
        assert!(object_path("x/../nodes", Some("a")).is_err());
        assert!(object_path("x", Some("a/b")).is_err());
        assert!(object_path("x", Some("a?b")).is_err());
    }
}
