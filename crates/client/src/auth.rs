//! Keystone v3 authentication methods and the token they yield.

use serde_json::{json, Value};

/// A domain, by name or by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Domain {
    Name(String),
    Id(String),
}

impl Domain {
    fn json(&self) -> Value {
        match self {
            Domain::Name(n) => json!({ "name": n }),
            Domain::Id(i) => json!({ "id": i }),
        }
    }
}

impl Default for Domain {
    fn default() -> Self {
        Domain::Name("Default".into())
    }
}

/// How to authenticate.
#[derive(Clone)]
pub enum Auth {
    /// A user's password, scoped to a project.
    Password {
        user: String,
        user_domain: Domain,
        /// Never logged.
        password: String,
        project: String,
        project_domain: Domain,
    },
    /// An application credential (its project scope is its own).
    ApplicationCredential {
        id: String,
        /// Never logged.
        secret: String,
    },
}

impl Auth {
    /// Password auth for `user` in project `project`, both in the `Default` domain.
    pub fn password(user: &str, password: &str, project: &str) -> Auth {
        Auth::Password {
            user: user.to_string(),
            user_domain: Domain::default(),
            password: password.to_string(),
            project: project.to_string(),
            project_domain: Domain::default(),
        }
    }

    /// Who authenticates, for logs (no secret).
    pub fn who(&self) -> String {
        match self {
            Auth::Password { user, project, .. } => format!("user {user}, project {project}"),
            Auth::ApplicationCredential { id, .. } => format!("application credential {id}"),
        }
    }

    pub(crate) fn request_body(&self) -> Value {
        match self {
            Auth::Password {
                user,
                user_domain,
                password,
                project,
                project_domain,
            } => json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": user, "domain": user_domain.json(), "password": password}}},
                "scope": {"project": {"name": project, "domain": project_domain.json()}}}}),
            Auth::ApplicationCredential { id, secret } => json!({"auth": {
                "identity": {"methods": ["application_credential"],
                    "application_credential": {"id": id, "secret": secret}}}}),
        }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Password {
                user,
                user_domain,
                project,
                project_domain,
                ..
            } => f
                .debug_struct("Password")
                .field("user", user)
                .field("user_domain", user_domain)
                .field("password", &"<redacted>")
                .field("project", project)
                .field("project_domain", project_domain)
                .finish(),
            Auth::ApplicationCredential { id, .. } => f
                .debug_struct("ApplicationCredential")
                .field("id", id)
                .field("secret", &"<redacted>")
                .finish(),
        }
    }
}

/// A Keystone token. Shown as `<redacted>`; [`Token::secret`] is for the request header only.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(token: String) -> Token {
        Token(token)
    }

    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let a = Auth::password("n", "hunter2-secret", "service");
        assert!(!format!("{a:?}").contains("hunter2"));
        assert_eq!(
            a.request_body()["auth"]["identity"]["password"]["user"]["password"],
            "hunter2-secret"
        );
        let a = Auth::ApplicationCredential {
            id: "ac1".into(),
            secret: "s3cr3t-value".into(),
        };
        assert!(!format!("{a:?}").contains("s3cr3t"));
        assert!(!format!("{:?}", Token::new("gAAAA-token".into())).contains("gAAAA"));
    }
}
