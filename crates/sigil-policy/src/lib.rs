//! Cedar policy for sigil: the schema shipped with sigil, the entity model (a workload by
//! SPIFFE ID in its groups; models, tools, endpoints), and a decision API that returns the
//! decision with the ids of the policies that made it. Does no I/O: policy text comes in as
//! strings.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicyId, PolicySet, Request, RestrictedExpression, Schema, ValidationMode,
    Validator,
};

/// The Cedar schema every sigil policy is validated against.
pub const SCHEMA: &str = include_str!("../../../policy/sigil.cedarschema");

/// Why policies could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("schema: {0}")]
    Schema(String),
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("policies do not validate against the schema:\n{0}")]
    Invalid(String),
    #[error("bad request: {0}")]
    Request(String),
}

/// The caller, as policy sees it.
#[derive(Debug, Clone)]
pub struct Principal<'a> {
    pub spiffe_id: &'a str,
    pub trust_domain: &'a str,
    pub groups: &'a [String],
}

/// One authorization question.
#[derive(Debug, Clone)]
pub struct Query<'a> {
    pub principal: Principal<'a>,
    /// `invoke`, `list_models`, `call_tool`, `list_tools`, `mcp`, `http`.
    pub action: &'a str,
    /// `Model`, `Tool`, `Endpoint`.
    pub resource_type: &'a str,
    pub resource_id: &'a str,
    pub scopes: &'a [String],
    /// Hour of day (0-23, UTC) and weekday (0 = Monday) of the request.
    pub hour: i64,
    pub weekday: i64,
}

/// A decision: allow or not, which policies decided, and any evaluation errors (which never
/// turn into an allow).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub policy_ids: Vec<String>,
    pub errors: Vec<String>,
}

/// A validated set of policies.
pub struct PolicyEngine {
    policies: PolicySet,
    schema: Schema,
    authorizer: Authorizer,
}

impl PolicyEngine {
    /// Parses `files` (name, Cedar text) and validates them against [`SCHEMA`]. Policies keep
    /// their `@id("...")` annotation as id, or get `<file>#<n>`.
    pub fn new(files: &[(String, String)]) -> Result<Self, PolicyError> {
        let (schema, _) =
            Schema::from_cedarschema_str(SCHEMA).map_err(|e| PolicyError::Schema(e.to_string()))?;
        let mut policies = PolicySet::new();
        for (file, text) in files {
            let parsed = PolicySet::from_str(text).map_err(|e| PolicyError::Parse {
                file: file.clone(),
                message: e.to_string(),
            })?;
            for (n, p) in parsed.policies().enumerate() {
                let id = p
                    .annotation("id")
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{file}#{n}"));
                let p = p.new_id(PolicyId::new(id.clone()));
                policies.add(p).map_err(|e| PolicyError::Parse {
                    file: file.clone(),
                    message: format!("policy {id}: {e}"),
                })?;
            }
        }
        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if !result.validation_passed() {
            let msgs: Vec<String> = result
                .validation_errors()
                .map(|e| format!("  {e}"))
                .collect();
            return Err(PolicyError::Invalid(msgs.join("\n")));
        }
        Ok(Self {
            policies,
            schema,
            authorizer: Authorizer::new(),
        })
    }

    /// How many policies are loaded.
    pub fn len(&self) -> usize {
        self.policies.policies().count()
    }

    /// Whether no policy is loaded (then everything is denied).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides one query. Default deny: no permit, any forbid, or any error → not allowed.
    pub fn decide(&self, q: &Query<'_>) -> Result<Decision, PolicyError> {
        let bad = |e: &dyn std::fmt::Display| PolicyError::Request(e.to_string());
        let uid = |ty: &str, id: &str| -> Result<EntityUid, PolicyError> {
            let ty = EntityTypeName::from_str(ty).map_err(|e| bad(&e))?;
            Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
        };
        let principal = uid("Workload", q.principal.spiffe_id)?;
        let groups: HashSet<EntityUid> = q
            .principal
            .groups
            .iter()
            .map(|g| uid("Group", g))
            .collect::<Result<_, _>>()?;
        let attrs = HashMap::from([(
            "trust_domain".to_owned(),
            RestrictedExpression::new_string(q.principal.trust_domain.to_owned()),
        )]);
        let mut entities =
            vec![Entity::new(principal.clone(), attrs, groups.clone()).map_err(|e| bad(&e))?];
        for g in groups {
            entities.push(Entity::new_no_attrs(g, HashSet::new()));
        }
        let entities =
            Entities::from_entities(entities, Some(&self.schema)).map_err(|e| bad(&e))?;
        let action = uid("Action", q.action)?;
        let resource = uid(q.resource_type, q.resource_id)?;
        let context = Context::from_pairs([
            (
                "scopes".to_owned(),
                RestrictedExpression::new_set(
                    q.scopes
                        .iter()
                        .map(|s| RestrictedExpression::new_string(s.clone())),
                ),
            ),
            ("hour".to_owned(), RestrictedExpression::new_long(q.hour)),
            (
                "weekday".to_owned(),
                RestrictedExpression::new_long(q.weekday),
            ),
        ])
        .map_err(|e| bad(&e))?;
        let request = Request::new(principal, action, resource, context, Some(&self.schema))
            .map_err(|e| bad(&e))?;
        let resp = self
            .authorizer
            .is_authorized(&request, &self.policies, &entities);
        let errors: Vec<String> = resp.diagnostics().errors().map(|e| e.to_string()).collect();
        Ok(Decision {
            allow: resp.decision() == CedarDecision::Allow && errors.is_empty(),
            policy_ids: resp.diagnostics().reason().map(|p| p.to_string()).collect(),
            errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> PolicyEngine {
        let demo = include_str!("../../../policy/demo.cedar");
        PolicyEngine::new(&[("demo.cedar".into(), demo.into())]).unwrap()
    }

    fn q<'a>(
        groups: &'a [String],
        action: &'a str,
        rt: &'a str,
        rid: &'a str,
        scopes: &'a [String],
    ) -> Query<'a> {
        Query {
            principal: Principal {
                spiffe_id: "spiffe://td/cam",
                trust_domain: "td",
                groups,
            },
            action,
            resource_type: rt,
            resource_id: rid,
            scopes,
            hour: 10,
            weekday: 1,
        }
    }

    #[test]
    fn demo_policy_allows_only_factory_floor_with_scope() {
        let e = engine();
        let ff = vec!["factory-floor".to_string()];
        let other = vec!["office".to_string()];
        let scope = vec!["model:invoke".to_string()];
        let d = e
            .decide(&q(&ff, "invoke", "Model", "defect-detector", &scope))
            .unwrap();
        assert!(d.allow);
        assert_eq!(d.policy_ids, ["factory-floor-defect-detector"]);
        assert!(
            !e.decide(&q(&other, "invoke", "Model", "defect-detector", &scope))
                .unwrap()
                .allow
        );
        assert!(
            !e.decide(&q(&ff, "invoke", "Model", "gpt-x", &scope))
                .unwrap()
                .allow
        );
        assert!(
            !e.decide(&q(&ff, "invoke", "Model", "defect-detector", &[]))
                .unwrap()
                .allow
        );
        assert!(
            !e.decide(&q(&ff, "call_tool", "Tool", "shutdown", &scope))
                .unwrap()
                .allow
        );
        assert!(
            e.decide(&q(&other, "list_models", "Endpoint", "/v1/models", &[]))
                .unwrap()
                .allow
        );
    }

    #[test]
    fn invalid_policies_are_refused_with_the_reason() {
        let typo = "permit(principal, action == Action::\"invok\", resource);";
        assert!(matches!(
            PolicyEngine::new(&[("t.cedar".into(), typo.into())]),
            Err(PolicyError::Invalid(_))
        ));
        let wrong_attr = "permit(principal, action == Action::\"invoke\", resource) when { principal.team == \"x\" };";
        assert!(matches!(
            PolicyEngine::new(&[("t.cedar".into(), wrong_attr.into())]),
            Err(PolicyError::Invalid(_))
        ));
        assert!(matches!(
            PolicyEngine::new(&[("t.cedar".into(), "permit(".into())]),
            Err(PolicyError::Parse { .. })
        ));
        // No policies: everything is denied.
        let none = PolicyEngine::new(&[]).unwrap();
        let ff = vec!["factory-floor".to_string()];
        assert!(
            !none
                .decide(&q(&ff, "invoke", "Model", "m", &[]))
                .unwrap()
                .allow
        );
    }

    #[test]
    fn forbid_wins() {
        let text = r#"
            permit(principal, action == Action::"invoke", resource);
            @id("no-gpt") forbid(principal, action == Action::"invoke", resource == Model::"gpt");
        "#;
        let e = PolicyEngine::new(&[("p.cedar".into(), text.into())]).unwrap();
        let g = vec![];
        assert!(
            e.decide(&q(&g, "invoke", "Model", "llama", &[]))
                .unwrap()
                .allow
        );
        let d = e.decide(&q(&g, "invoke", "Model", "gpt", &[])).unwrap();
        assert!(!d.allow);
        assert_eq!(d.policy_ids, ["no-gpt"]);
    }
}
