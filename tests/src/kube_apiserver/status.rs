//! Failures as the API server reports them: an HTTP status and a `Status` object body
//! (`kind: Status`, `status: Failure`, a machine-readable `reason`, the `code`), the shape
//! client libraries (kube-rs's `ErrorResponse`, client-go's `StatusError`) decode.

use serde_json::{json, Value};

/// The account named in `Forbidden` messages: the one the Trellis manifest gives the daemon.
pub const SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:kube-system:trellis";

#[derive(Debug)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `details` (`name`, `kind`), when the real server gives them.
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, plural: &str, name: Option<&str>) -> ApiError {
        self.details = Some(match name {
            Some(name) => json!({"name": name, "kind": plural}),
            None => json!({"kind": plural}),
        });
        self
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn not_found(plural: &str, name: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("{plural} \"{name}\" not found")).with_details(plural, Some(name))
    }

    /// A path that names no resource the stand-in serves.
    pub fn no_such_resource() -> ApiError {
        ApiError::new(404, "NotFound", "the server could not find the requested resource")
    }

    pub fn already_exists(plural: &str, name: &str) -> ApiError {
        ApiError::new(409, "AlreadyExists", format!("{plural} \"{name}\" already exists"))
            .with_details(plural, Some(name))
    }

    /// A patch whose `metadata.resourceVersion` (an optimistic-concurrency precondition) is stale.
    pub fn conflict(plural: &str, name: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; please apply \
                 your changes to the latest version and try again"
            ),
        )
        .with_details(plural, Some(name))
    }

    pub fn method_not_allowed(method: &str, plural: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the stand-in API server does not implement {method} on {plural}"),
        )
    }

    pub fn unsupported_media_type(content_type: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type:?}) - accepted media types of the \
                 stand-in include: application/merge-patch+json, application/strategic-merge-patch+json"
            ),
        )
    }

    /// A watch or list from a resource version older than the retained history (compacted).
    pub fn too_old(requested: u64, oldest: u64) -> ApiError {
        ApiError::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// A `continue` token whose snapshot is gone (compacted, or pushed out by newer ones).
    pub fn continue_expired() -> ApiError {
        ApiError::new(
            410,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. You can start a new \
             list without the continue parameter, or use the continue value from the response to get a \
             consistent list.",
        )
    }

    /// A resource version the server has not reached (the real one waits up to 3 s first).
    pub fn too_large(requested: u64, current: u64) -> ApiError {
        ApiError::new(
            504,
            "Timeout",
            format!("Too large resource version: {requested}, current: {current}"),
        )
    }

    /// What RBAC answers when the service account may not do `verb` on the resource.
    pub fn forbidden(verb: &str, plural: &str, name: Option<&str>) -> ApiError {
        let what = match name {
            Some(name) => format!("{plural} \"{name}\""),
            None => plural.to_string(),
        };
        ApiError::new(
            403,
            "Forbidden",
            format!(
                "{what} is forbidden: User \"{SERVICE_ACCOUNT_USER}\" cannot {verb} resource \"{plural}\" in API \
                 group \"\" at the cluster scope"
            ),
        )
        .with_details(plural, name)
    }

    /// Any other failure code, with the reason and message the real server uses for it.
    pub fn from_code(code: u16) -> ApiError {
        let (reason, message) = match code {
            429 => ("TooManyRequests", "Too many requests, please try again later."),
            500 => (
                "InternalError",
                "Internal error occurred: the stand-in API server was told to fail",
            ),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            504 => ("Timeout", "Timeout: request did not complete within requested timeout"),
            _ => ("", "the stand-in API server was told to fail"),
        };
        ApiError::new(code, reason, message)
    }

    /// The `Status` object.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            s["details"] = details.clone();
        }
        s
    }
}
