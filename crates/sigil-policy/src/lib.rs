//! Cedar policy for sigil: the schema shipped with sigil, the entity model (a workload by
//! SPIFFE ID in its groups; models, tools, endpoints; the arguments of a tool call), and a
//! decision API that returns the decision with the ids of the policies that made it. Does no
//! I/O: policy text comes in as strings.
//!
//! Decisions are fast with many policies: at load time every policy is indexed by its scope
//! (action and resource), one [`PolicySet`] is precomputed per (action, resource) that a
//! policy names plus a fallback per action, and a request is evaluated against its slice
//! only. See `docs/policy.md` for the design and the soundness argument. A request's entities
//! and context depend only on the caller and the hour (and the arguments of a tool call), so
//! they are built once per caller and reused (a bounded cache per engine); a decision on a
//! call without arguments is a function of those, the action and the resource, so it is made
//! once and recalled (until the engine is replaced by a policy reload).
#![forbid(unsafe_code)]

pub mod bundle;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, Policy, PolicyId, PolicySet, Request, ResourceConstraint, Response,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use serde_json::Value;

/// The Cedar schema every sigil policy is validated against.
pub const SCHEMA: &str = include_str!("../../../policy/sigil.cedarschema");

/// At most this many tags (flattened argument keys) per tool call; more is refused.
pub const MAX_ARGUMENT_TAGS: usize = 256;
/// At most this many bytes per flattened argument key (`a.b.c`); longer is refused.
pub const MAX_ARGUMENT_KEY_BYTES: usize = 256;
/// At most this deep a nesting of argument values (a top-level value is at depth 1); deeper
/// is refused.
pub const MAX_ARGUMENT_DEPTH: usize = 8;

/// The id of the one `Arguments` entity of a request (`context.arguments`).
const ARGUMENTS_ID: &str = "arguments";
/// Most callers whose request parts are kept per engine; beyond that the cache is cleared.
const CALLER_CACHE: usize = 4096;
/// Most decisions remembered per caller; beyond that they are forgotten.
const DECISIONS_PER_CALLER: usize = 256;

/// Why policies could not be loaded, or a request could not be evaluated.
#[derive(Debug, Clone, thiserror::Error)]
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
    #[error("tool arguments refused: {0}")]
    Arguments(String),
    #[error("policy index: {0}")]
    Index(String),
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
    /// The arguments of an MCP `tools/call` (a JSON object; `None` or `null`: no arguments).
    /// They reach policy as the tags of `context.arguments` (see [`argument_tags`]).
    pub arguments: Option<&'a Value>,
    /// Whom the caller acts for, when its token was delegated (`context.delegation`).
    pub delegation: Option<&'a Delegation>,
    /// The risk of the caller's node (`context.risk`); `None`: unknown, which policy sees
    /// as level `unknown`, score 100 (so a permit that requires low risk does not apply).
    pub risk: Option<&'a RiskContext>,
}

/// A caller's node risk, as policy sees it in `context.risk`: `level` (`low`, `medium`,
/// `high`, `critical`, or `unknown`), `score` (0-100), `at` (when the trust authority
/// assessed it, unix seconds) and `node` (the node's SPIFFE ID, "" when unknown).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RiskContext {
    pub level: String,
    pub score: i64,
    pub at: i64,
    pub node: String,
}

impl RiskContext {
    /// What policy sees when the risk is not known.
    pub fn unknown() -> Self {
        Self {
            level: "unknown".into(),
            score: 100,
            at: 0,
            node: String::new(),
        }
    }
}

/// A delegated token's user and chain, as policy sees them in `context.delegation`:
/// `user`, `groups` (the user's), `chain` (the SPIFFE IDs of every workload acting, as a
/// set) and `depth` (how many there are; 1 when the caller acts directly for the user).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Delegation {
    pub user: String,
    pub groups: Vec<String>,
    /// The actors, the current one (the caller) first.
    pub chain: Vec<String>,
}

/// A decision: allow or not, which policies decided, and any evaluation errors (which never
/// turn into an allow). Both lists are sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub policy_ids: Vec<String>,
    pub errors: Vec<String>,
}

/// The policies that can apply to one action.
struct ActionSlices {
    uid: EntityUid,
    /// The resource types the schema lets this action apply to, by name.
    resource_types: HashMap<String, EntityTypeName>,
    /// For each resource named by some policy's `resource == R`: the policies whose scope can
    /// match this action on R.
    by_resource: HashMap<EntityUid, PolicySet>,
    /// The policies whose scope can match this action on any other resource.
    fallback: PolicySet,
}

/// What policy text compiles to: parsed, validated and indexed. A function of the schema
/// text and the policy files only (see [`compiled`]).
struct Compiled {
    policies: PolicySet,
    schema: Schema,
    actions: HashMap<String, ActionSlices>,
    /// The schema's action entities, added to each request's entities when the schema has
    /// action groups (so that `action in Action::"group"` evaluates as with the schema).
    action_entities: Vec<Entity>,
}

/// A validated set of policies.
pub struct PolicyEngine {
    compiled: Arc<Compiled>,
    authorizer: Authorizer,
    workload: EntityTypeName,
    group: EntityTypeName,
    arguments: EntityTypeName,
    /// When the set came from a signed bundle: its revision and its `not_after` (unix
    /// seconds), from which on the set must not be enforced (see [`PolicyEngine::expired`]).
    bundle: Option<(u64, i64)>,
    /// The request parts of recent callers, by a hash of what they were built from (checked
    /// in full on every hit).
    callers: Mutex<HashMap<u64, Arc<CallerParts>>>,
    hasher: RandomState,
}

/// A caller as policy sees it, owned: what a [`Query`] carries besides the action and the
/// resource (e.g. kept with a response that is filtered by what the caller may do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub spiffe_id: String,
    pub trust_domain: String,
    pub groups: Vec<String>,
    pub scopes: Vec<String>,
    pub hour: i64,
    pub weekday: i64,
    pub delegation: Option<Delegation>,
    pub risk: Option<RiskContext>,
}

impl Caller {
    /// The caller of `q`.
    pub fn of(q: &Query<'_>) -> Self {
        Self {
            spiffe_id: q.principal.spiffe_id.to_owned(),
            trust_domain: q.principal.trust_domain.to_owned(),
            groups: q.principal.groups.to_vec(),
            scopes: q.scopes.to_vec(),
            hour: q.hour,
            weekday: q.weekday,
            delegation: q.delegation.cloned(),
            risk: q.risk.cloned(),
        }
    }

    /// This caller's query for `action` on `resource_type::resource_id`, without arguments.
    pub fn query<'a>(
        &'a self,
        action: &'a str,
        resource_type: &'a str,
        resource_id: &'a str,
    ) -> Query<'a> {
        Query {
            principal: Principal {
                spiffe_id: &self.spiffe_id,
                trust_domain: &self.trust_domain,
                groups: &self.groups,
            },
            action,
            resource_type,
            resource_id,
            scopes: &self.scopes,
            hour: self.hour,
            weekday: self.weekday,
            arguments: None,
            delegation: self.delegation.as_ref(),
            risk: self.risk.as_ref(),
        }
    }

    /// Whether `q` is by this caller.
    fn is_for(&self, q: &Query<'_>) -> bool {
        self.hour == q.hour
            && self.weekday == q.weekday
            && self.spiffe_id == q.principal.spiffe_id
            && self.trust_domain == q.principal.trust_domain
            && self.groups == q.principal.groups
            && self.scopes == q.scopes
            && self.delegation.as_ref() == q.delegation
            && self.risk.as_ref() == q.risk
    }
}

/// What a request's principal, entities and context are for a caller, when the call has no
/// arguments: they depend only on the caller, never on the action or resource. A call with
/// arguments adds its `Arguments` entity to `members`.
struct CallerParts {
    caller: Caller,
    principal: EntityUid,
    /// The workload, its groups and the schema's action entities (their hierarchy
    /// computed): a call with arguments adds its `Arguments` entity to a copy.
    members: Entities,
    /// `members` and an `Arguments` entity without tags.
    entities: Entities,
    context: Context,
    /// Decisions on calls without arguments, by a hash of action and resource.
    decisions: Mutex<HashMap<u64, Recalled>>,
}

/// One remembered decision of a caller.
struct Recalled {
    action: String,
    resource_type: String,
    resource_id: String,
    decision: Decision,
}

impl CallerParts {
    /// The decision made earlier for this caller on `q`'s action and resource, if any.
    fn recall(&self, key: u64, q: &Query<'_>) -> Option<Decision> {
        let m = self.decisions.lock().ok()?;
        let r = m.get(&key)?;
        (r.action == q.action
            && r.resource_type == q.resource_type
            && r.resource_id == q.resource_id)
            .then(|| r.decision.clone())
    }

    fn remember(&self, key: u64, q: &Query<'_>, d: &Decision) {
        if let Ok(mut m) = self.decisions.lock() {
            if m.len() >= DECISIONS_PER_CALLER {
                m.clear();
            }
            m.insert(
                key,
                Recalled {
                    action: q.action.to_owned(),
                    resource_type: q.resource_type.to_owned(),
                    resource_id: q.resource_id.to_owned(),
                    decision: d.clone(),
                },
            );
        }
    }
}

/// How many distinct schema texts [`parsed_schema`] keeps.
const SCHEMA_CACHE: usize = 4;

/// Parses Cedar schema text, once per distinct text in this process. Every policy bundle
/// carries the schema, nearly always the same text, and parsing it is most of the cost of
/// putting a bundle in force (Cedar's schema grammar re-lexes each identifier): a device
/// with several proxies, or a test fleet of hundreds, would parse it again per proxy and
/// per change.
fn parsed_schema(text: &str) -> Result<Schema, PolicyError> {
    static PARSED: Mutex<Vec<(Arc<str>, Schema)>> = Mutex::new(Vec::new());
    let hit = PARSED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(t, _)| **t == *text)
        .map(|(_, s)| s.clone());
    if let Some(s) = hit {
        return Ok(s);
    }
    let (schema, _) =
        Schema::from_cedarschema_str(text).map_err(|e| PolicyError::Schema(e.to_string()))?;
    let mut parsed = PARSED.lock().unwrap_or_else(|e| e.into_inner());
    if parsed.len() >= SCHEMA_CACHE {
        parsed.remove(0);
    }
    parsed.push((Arc::from(text), schema.clone()));
    Ok(schema)
}

/// How many distinct policy texts [`compiled`] keeps.
const COMPILED_CACHE: usize = 4;

/// The text a [`Compiled`] was made from.
type CompiledKey = (Arc<str>, Vec<(String, String)>);

/// A compilation, done once by whoever asks first while the others wait for it.
type CompiledCell = Arc<std::sync::OnceLock<Result<Arc<Compiled>, PolicyError>>>;

/// Compiles `files` against `schema_text`, once per distinct text in this process: every
/// proxy of a process (a device with several sidecars, or a test fleet of hundreds on one
/// runtime) that is offered the same bundle shares one compilation, and those offered it at
/// the same moment wait for the first instead of each parsing it again. Compiling is a pure
/// function of the text, so sharing it changes no decision; each engine keeps its own
/// caller and decision caches.
fn compiled(schema_text: &str, files: &[(String, String)]) -> Result<Arc<Compiled>, PolicyError> {
    static CACHE: Mutex<Vec<(CompiledKey, CompiledCell)>> = Mutex::new(Vec::new());
    let cell = {
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let hit = cache
            .iter()
            .find(|((schema, f), _)| **schema == *schema_text && f.as_slice() == files)
            .map(|(_, cell)| cell.clone());
        match hit {
            Some(cell) => cell,
            None => {
                if cache.len() >= COMPILED_CACHE {
                    cache.remove(0);
                }
                let cell = CompiledCell::default();
                cache.push(((Arc::from(schema_text), files.to_vec()), cell.clone()));
                cell
            }
        }
    };
    cell.get_or_init(|| compile(schema_text, files).map(Arc::new))
        .clone()
}

/// Parses `files`, validates them against `schema_text` and indexes them by action.
fn compile(schema_text: &str, files: &[(String, String)]) -> Result<Compiled, PolicyError> {
    let schema = parsed_schema(schema_text)?;
    let mut policies = PolicySet::new();
    for (file, text) in files {
        let parsed = PolicySet::from_str(text).map_err(|e| PolicyError::Parse {
            file: file.clone(),
            message: e.to_string(),
        })?;
        if let Some(t) = parsed.templates().next() {
            return Err(PolicyError::Parse {
                file: file.clone(),
                message: format!(
                    "template {} (a policy with ?principal or ?resource): templates are not supported",
                    t.id()
                ),
            });
        }
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
    let (actions, action_entities) = index(&schema, &policies)?;
    Ok(Compiled {
        policies,
        schema,
        actions,
        action_entities,
    })
}

fn type_name(name: &str) -> Result<EntityTypeName, PolicyError> {
    EntityTypeName::from_str(name).map_err(|e| PolicyError::Schema(e.to_string()))
}

impl PolicyEngine {
    /// Parses `files` (name, Cedar text) and validates them against [`SCHEMA`]. Policies keep
    /// their `@id("...")` annotation as id, or get `<file>#<n>`. Templates are refused (sigil
    /// has no way to link them).
    pub fn new(files: &[(String, String)]) -> Result<Self, PolicyError> {
        Self::with_schema(SCHEMA, files)
    }

    /// [`PolicyEngine::new`] against another schema (Cedar schema text), e.g. the one a
    /// signed policy bundle carries.
    pub fn with_schema(schema_text: &str, files: &[(String, String)]) -> Result<Self, PolicyError> {
        Ok(Self {
            compiled: compiled(schema_text, files)?,
            authorizer: Authorizer::new(),
            workload: type_name("Workload")?,
            group: type_name("Group")?,
            arguments: type_name("Arguments")?,
            bundle: None,
            callers: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
        })
    }

    /// Marks the set as coming from bundle `revision`, valid until `not_after`.
    pub fn with_bundle(mut self, revision: u64, not_after: i64) -> Self {
        self.bundle = Some((revision, not_after));
        self
    }

    /// The bundle revision and expiry the set came from, if any.
    pub fn bundle(&self) -> Option<(u64, i64)> {
        self.bundle
    }

    /// Whether the set came from a bundle that has expired at `now`: then nothing may be
    /// decided with it (the enforcer refuses every request). Sets loaded from files never
    /// expire.
    pub fn expired(&self, now: i64) -> bool {
        self.bundle.is_some_and(|(_, not_after)| now >= not_after)
    }

    /// How many policies are loaded.
    pub fn len(&self) -> usize {
        self.compiled.policies.policies().count()
    }

    /// Whether no policy is loaded (then everything is denied).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides one query. Default deny: no permit, any forbid, or any error → not allowed. An
    /// `Err` (unknown action, resource type the action does not apply to, refused arguments)
    /// must be treated as a deny too.
    ///
    /// Evaluates only the policies whose scope can match the query's action and resource, on
    /// entities built without a schema check: they are well-typed by construction (see
    /// [`PolicyEngine::decide_reference`], which checks them, and the tests comparing both).
    pub fn decide(&self, q: &Query<'_>) -> Result<Decision, PolicyError> {
        let slices = self
            .compiled
            .actions
            .get(q.action)
            .ok_or_else(|| PolicyError::Request(format!("unknown action {:?}", q.action)))?;
        let rtype = slices.resource_types.get(q.resource_type).ok_or_else(|| {
            PolicyError::Request(format!(
                "action {:?} does not apply to resource type {:?}",
                q.action, q.resource_type
            ))
        })?;
        let tags = argument_tags(q.arguments)?;
        let caller = self.caller_parts(q)?;
        // Without arguments, the decision is a function of the caller's parts, the action and
        // the resource only (Cedar evaluation is deterministic): decided once, then recalled.
        let memo_key = tags.is_empty().then(|| {
            self.hasher
                .hash_one((q.action, q.resource_type, q.resource_id))
        });
        if let Some(key) = memo_key
            && let Some(d) = caller.recall(key, q)
        {
            return Ok(d);
        }
        // Recalled decisions need neither the resource's entity nor its policies.
        let resource =
            EntityUid::from_type_name_and_id(rtype.clone(), EntityId::new(q.resource_id));
        let set = slices
            .by_resource
            .get(&resource)
            .unwrap_or(&slices.fallback);
        let with_arguments;
        let entities = if tags.is_empty() {
            &caller.entities
        } else {
            // The arguments entity has no parents and is nobody's: adding it to the
            // caller's entities extends their hierarchy without recomputing it.
            with_arguments = caller
                .members
                .clone()
                .add_entities([self.arguments_entity(tags)?], None)
                .map_err(bad)?;
            &with_arguments
        };
        let (principal, context) = (caller.principal.clone(), caller.context.clone());
        let request =
            Request::new(principal, slices.uid.clone(), resource, context, None).map_err(bad)?;
        let d = decision(&self.authorizer.is_authorized(&request, set, entities));
        if let Some(key) = memo_key {
            caller.remember(key, q, &d);
        }
        Ok(d)
    }

    /// The request parts of this caller: from the cache when it was seen (same identity,
    /// groups, scopes, hour and weekday), else built and kept.
    fn caller_parts(&self, q: &Query<'_>) -> Result<Arc<CallerParts>, PolicyError> {
        let key = self.hasher.hash_one((
            q.principal.spiffe_id,
            q.principal.trust_domain,
            q.principal.groups,
            q.scopes,
            q.hour,
            q.weekday,
            q.delegation,
            q.risk,
        ));
        let hit = self
            .callers
            .lock()
            .ok()
            .and_then(|m| m.get(&key).filter(|p| p.caller.is_for(q)).cloned());
        if let Some(p) = hit {
            return Ok(p);
        }
        let (principal, mut members) = self.caller_entities(q)?;
        members.extend(self.compiled.action_entities.iter().cloned());
        let members = Entities::from_entities(members, None).map_err(bad)?;
        let entities = members
            .clone()
            .add_entities([self.arguments_entity(Vec::new())?], None)
            .map_err(bad)?;
        let parts = Arc::new(CallerParts {
            caller: Caller::of(q),
            principal,
            members,
            entities,
            context: self.context(q)?,
            decisions: Mutex::new(HashMap::new()),
        });
        if let Ok(mut m) = self.callers.lock() {
            if m.len() >= CALLER_CACHE {
                m.clear();
            }
            m.insert(key, parts.clone());
        }
        Ok(parts)
    }

    /// Decides one query the slow, plain way: every policy, and the request and its entities
    /// checked against the schema. Gives the same answer as [`PolicyEngine::decide`]; for tests
    /// and benchmarks.
    #[doc(hidden)]
    pub fn decide_reference(&self, q: &Query<'_>) -> Result<Decision, PolicyError> {
        let uid = |ty: &str, id: &str| -> Result<EntityUid, PolicyError> {
            let ty = EntityTypeName::from_str(ty).map_err(bad)?;
            Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
        };
        let action = uid("Action", q.action)?;
        let resource = uid(q.resource_type, q.resource_id)?;
        let (principal, entities, context) = self.request_parts(q, argument_tags(q.arguments)?)?;
        self.decide_checked(principal, action, resource, context, entities)
    }

    /// Decides a sealed model's key release (action `decrypt` on `Model::"<model>"`) the
    /// plain way: every policy, the request and its entities checked against the schema.
    /// `q` gives the principal, hour and weekday (its action, resource and scopes are not
    /// used: scopes are empty, there are no arguments); the context adds the node's SPIFFE ID,
    /// its attestation selectors and the model version. Default deny, as [`Self::decide`];
    /// an `Err` (e.g. a bundle whose schema has no `decrypt`) must be treated as a deny.
    pub fn decide_release(
        &self,
        q: &Query<'_>,
        model: &str,
        model_version: i64,
        node: &str,
        node_selectors: &[String],
    ) -> Result<Decision, PolicyError> {
        self.decide_at_authority(
            q,
            ("decrypt", "Model", model),
            node,
            node_selectors,
            [(
                "model_version".to_owned(),
                RestrictedExpression::new_long(model_version),
            )],
        )
    }

    /// Decides reading a secret (action `read_secret` on `Secret::"<path>"`) the plain way,
    /// with the same principal and context as [`Self::decide_release`] (without a model
    /// version). Default deny; an `Err` must be treated as a deny.
    pub fn decide_secret_read(
        &self,
        q: &Query<'_>,
        path: &str,
        node: &str,
        node_selectors: &[String],
    ) -> Result<Decision, PolicyError> {
        self.decide_at_authority(q, ("read_secret", "Secret", path), node, node_selectors, [])
    }

    /// A decision at the trust authority: `(action, resource type, resource id)` for the
    /// principal, hour and weekday of `q`, with empty scopes, no arguments, the node and its
    /// selectors and `extra` in the context; every policy, the request and its entities
    /// checked against the schema.
    fn decide_at_authority(
        &self,
        q: &Query<'_>,
        (action, resource_type, resource_id): (&str, &str, &str),
        node: &str,
        node_selectors: &[String],
        extra: impl IntoIterator<Item = (String, RestrictedExpression)>,
    ) -> Result<Decision, PolicyError> {
        let uid = |ty: &str, id: &str| -> Result<EntityUid, PolicyError> {
            let ty = EntityTypeName::from_str(ty).map_err(bad)?;
            Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
        };
        let action = uid("Action", action)?;
        let resource = uid(resource_type, resource_id)?;
        let (principal, mut entities) = self.caller_entities(q)?;
        entities.push(self.arguments_entity(Vec::new())?);
        let context = Context::from_pairs(
            [
                (
                    "scopes".to_owned(),
                    RestrictedExpression::new_set(std::iter::empty()),
                ),
                ("hour".to_owned(), RestrictedExpression::new_long(q.hour)),
                (
                    "weekday".to_owned(),
                    RestrictedExpression::new_long(q.weekday),
                ),
                (
                    "arguments".to_owned(),
                    RestrictedExpression::new_entity_uid(self.arguments_uid()),
                ),
                (
                    "node".to_owned(),
                    RestrictedExpression::new_string(node.to_owned()),
                ),
                (
                    "node_selectors".to_owned(),
                    RestrictedExpression::new_set(
                        node_selectors
                            .iter()
                            .map(|s| RestrictedExpression::new_string(s.clone())),
                    ),
                ),
            ]
            .into_iter()
            .chain(extra),
        )
        .map_err(bad)?;
        self.decide_checked(principal, action, resource, context, entities)
    }

    /// Decides with every policy, the request and its entities checked against the schema.
    fn decide_checked(
        &self,
        principal: EntityUid,
        action: EntityUid,
        resource: EntityUid,
        context: Context,
        entities: Vec<Entity>,
    ) -> Result<Decision, PolicyError> {
        let schema = Some(&self.compiled.schema);
        let entities = Entities::from_entities(entities, schema).map_err(bad)?;
        let request = Request::new(principal, action, resource, context, schema).map_err(bad)?;
        Ok(decision(&self.authorizer.is_authorized(
            &request,
            &self.compiled.policies,
            &entities,
        )))
    }

    /// The principal, the request's entities (the workload, its groups, the arguments with
    /// `tags`) and the context.
    fn request_parts(
        &self,
        q: &Query<'_>,
        tags: Vec<(String, String)>,
    ) -> Result<(EntityUid, Vec<Entity>, Context), PolicyError> {
        let (principal, mut entities) = self.caller_entities(q)?;
        entities.push(self.arguments_entity(tags)?);
        Ok((principal, entities, self.context(q)?))
    }

    /// The principal and its entities: the workload (with its `trust_domain`) and its groups.
    fn caller_entities(&self, q: &Query<'_>) -> Result<(EntityUid, Vec<Entity>), PolicyError> {
        let principal = EntityUid::from_type_name_and_id(
            self.workload.clone(),
            EntityId::new(q.principal.spiffe_id),
        );
        let groups: HashSet<EntityUid> = q
            .principal
            .groups
            .iter()
            .map(|g| EntityUid::from_type_name_and_id(self.group.clone(), EntityId::new(g)))
            .collect();
        let mut entities = Vec::with_capacity(groups.len() + 2);
        for g in &groups {
            entities.push(Entity::new_no_attrs(g.clone(), HashSet::new()));
        }
        entities.push(
            Entity::new_with_tags(
                principal.clone(),
                [(
                    "trust_domain".to_owned(),
                    RestrictedExpression::new_string(q.principal.trust_domain.to_owned()),
                )],
                groups,
                [],
            )
            .map_err(bad)?,
        );
        Ok((principal, entities))
    }

    /// The request's `Arguments` entity (`context.arguments`), with `tags`.
    fn arguments_entity(&self, tags: Vec<(String, String)>) -> Result<Entity, PolicyError> {
        Entity::new_with_tags(
            self.arguments_uid(),
            [],
            [],
            tags.into_iter()
                .map(|(k, v)| (k, RestrictedExpression::new_string(v))),
        )
        .map_err(bad)
    }

    fn arguments_uid(&self) -> EntityUid {
        EntityUid::from_type_name_and_id(self.arguments.clone(), EntityId::new(ARGUMENTS_ID))
    }

    /// The context: the token's scopes, the hour and weekday, the arguments entity, and the
    /// delegation when there is one.
    fn context(&self, q: &Query<'_>) -> Result<Context, PolicyError> {
        let strings = |v: &[String]| {
            RestrictedExpression::new_set(
                v.iter()
                    .map(|s| RestrictedExpression::new_string(s.clone())),
            )
        };
        let delegation = q
            .delegation
            .map(|d| -> Result<_, PolicyError> {
                let depth = i64::try_from(d.chain.len()).map_err(bad)?;
                let record = RestrictedExpression::new_record([
                    (
                        "user".to_owned(),
                        RestrictedExpression::new_string(d.user.clone()),
                    ),
                    ("groups".to_owned(), strings(&d.groups)),
                    ("chain".to_owned(), strings(&d.chain)),
                    ("depth".to_owned(), RestrictedExpression::new_long(depth)),
                ])
                .map_err(bad)?;
                Ok(("delegation".to_owned(), record))
            })
            .transpose()?;
        let unknown = RiskContext::unknown();
        let r = q.risk.unwrap_or(&unknown);
        let risk = RestrictedExpression::new_record([
            (
                "level".to_owned(),
                RestrictedExpression::new_string(r.level.clone()),
            ),
            ("score".to_owned(), RestrictedExpression::new_long(r.score)),
            ("at".to_owned(), RestrictedExpression::new_long(r.at)),
            (
                "node".to_owned(),
                RestrictedExpression::new_string(r.node.clone()),
            ),
        ])
        .map_err(bad)?;
        Context::from_pairs(
            [
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
                (
                    "arguments".to_owned(),
                    RestrictedExpression::new_entity_uid(self.arguments_uid()),
                ),
                ("risk".to_owned(), risk),
            ]
            .into_iter()
            .chain(delegation),
        )
        .map_err(bad)
    }
}

fn bad(e: impl std::fmt::Display) -> PolicyError {
    PolicyError::Request(e.to_string())
}

fn decision(resp: &Response) -> Decision {
    let mut errors: Vec<String> = resp.diagnostics().errors().map(|e| e.to_string()).collect();
    errors.sort();
    let mut policy_ids: Vec<String> = resp.diagnostics().reason().map(|p| p.to_string()).collect();
    policy_ids.sort();
    Decision {
        allow: resp.decision() == CedarDecision::Allow && errors.is_empty(),
        policy_ids,
        errors,
    }
}

/// Slices `policies` by scope: for each action of the schema, the policies whose action
/// constraint can match it, split by `resource == R` (into R's slice) or anything else (into
/// the fallback and every resource slice of the action). Also returns the schema's action
/// entities when it has action groups.
fn index(
    schema: &Schema,
    policies: &PolicySet,
) -> Result<(HashMap<String, ActionSlices>, Vec<Entity>), PolicyError> {
    let schema_actions = schema
        .action_entities()
        .map_err(|e| PolicyError::Schema(e.to_string()))?;
    // Each action with its ancestors (the action groups it is in).
    let actions: Vec<(EntityUid, HashSet<EntityUid>)> = schema
        .actions()
        .map(|a| {
            let ancestors = schema_actions
                .ancestors(a)
                .map(|it| it.cloned().collect())
                .unwrap_or_default();
            (a.clone(), ancestors)
        })
        .collect();
    let action_entities = if actions.iter().any(|(_, anc)| !anc.is_empty()) {
        schema_actions.iter().cloned().collect()
    } else {
        Vec::new()
    };
    // Per action: policies by `resource ==` target, and the others.
    let mut specific: HashMap<&EntityUid, HashMap<EntityUid, Vec<&Policy>>> = HashMap::new();
    let mut generic: HashMap<&EntityUid, Vec<&Policy>> = HashMap::new();
    for p in policies.policies() {
        let matches: Vec<&EntityUid> = match p.action_constraint() {
            ActionConstraint::Any => actions.iter().map(|(a, _)| a).collect(),
            ActionConstraint::Eq(x) => actions
                .iter()
                .map(|(a, _)| a)
                .filter(|a| **a == x)
                .collect(),
            ActionConstraint::In(xs) => actions
                .iter()
                .filter(|(a, anc)| xs.iter().any(|x| x == a || anc.contains(x)))
                .map(|(a, _)| a)
                .collect(),
        };
        let target = match p.resource_constraint() {
            ResourceConstraint::Eq(r) => Some(r),
            // `in`, `is`, `is in`, unconstrained: can match many resources.
            ResourceConstraint::Any
            | ResourceConstraint::In(_)
            | ResourceConstraint::Is(_)
            | ResourceConstraint::IsIn(_, _) => None,
        };
        for a in matches {
            match &target {
                Some(r) => specific
                    .entry(a)
                    .or_default()
                    .entry(r.clone())
                    .or_default()
                    .push(p),
                None => generic.entry(a).or_default().push(p),
            }
        }
    }
    let set = |ps: &mut dyn Iterator<Item = &Policy>| -> Result<PolicySet, PolicyError> {
        let mut s = PolicySet::new();
        for p in ps {
            s.add(p.clone())
                .map_err(|e| PolicyError::Index(e.to_string()))?;
        }
        Ok(s)
    };
    let mut out = HashMap::new();
    for (a, _) in &actions {
        if a.type_name().to_string() != "Action" {
            continue;
        }
        let none = Vec::new();
        let any_resource = generic.get(a).unwrap_or(&none);
        let mut by_resource = HashMap::new();
        if let Some(spec) = specific.remove(a) {
            for (r, ps) in spec {
                let s = set(&mut ps.iter().chain(any_resource.iter()).copied())?;
                by_resource.insert(r, s);
            }
        }
        let resource_types = schema
            .resources_for_action(a)
            .map(|it| it.map(|t| (t.to_string(), t.clone())).collect())
            .unwrap_or_default();
        out.insert(
            a.id().unescaped().to_owned(),
            ActionSlices {
                uid: a.clone(),
                resource_types,
                by_resource,
                fallback: set(&mut any_resource.iter().copied())?,
            },
        );
    }
    Ok((out, action_entities))
}

/// Flattens tool-call arguments into the tags of `context.arguments`: each top-level key is a
/// tag; a string value as is, a number or boolean as its JSON text, an object flattened into
/// dotted keys (`{"a": {"b": 1}}` → `a.b` = `1`; an empty object is the text `{}`), an array or
/// null as compact JSON text. `None` or `null`: no tags.
///
/// Refused (an error, which is a deny): arguments that are not an object, more than
/// [`MAX_ARGUMENT_TAGS`] tags, a key longer than [`MAX_ARGUMENT_KEY_BYTES`], nesting deeper
/// than [`MAX_ARGUMENT_DEPTH`], and two keys flattening to the same tag (`"a.b"` and
/// `{"a": {"b"}}`), which would make the value policy sees ambiguous.
pub fn argument_tags(arguments: Option<&Value>) -> Result<Vec<(String, String)>, PolicyError> {
    let obj = match arguments {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(PolicyError::Arguments(
                "tool arguments must be a JSON object".into(),
            ));
        }
    };
    let mut tags = HashMap::new();
    flatten(obj, None, 1, &mut tags)?;
    Ok(tags.into_iter().collect())
}

fn flatten(
    obj: &serde_json::Map<String, Value>,
    prefix: Option<&str>,
    depth: usize,
    tags: &mut HashMap<String, String>,
) -> Result<(), PolicyError> {
    if depth > MAX_ARGUMENT_DEPTH {
        return Err(PolicyError::Arguments(format!(
            "nested deeper than {MAX_ARGUMENT_DEPTH}"
        )));
    }
    for (k, v) in obj {
        let key = match prefix {
            Some(p) => format!("{p}.{k}"),
            None => k.clone(),
        };
        if key.len() > MAX_ARGUMENT_KEY_BYTES {
            return Err(PolicyError::Arguments(format!(
                "a key is longer than {MAX_ARGUMENT_KEY_BYTES} bytes"
            )));
        }
        match v {
            Value::Object(m) if !m.is_empty() => flatten(m, Some(&key), depth + 1, tags)?,
            _ => {
                if !within_depth(v, MAX_ARGUMENT_DEPTH - depth) {
                    return Err(PolicyError::Arguments(format!(
                        "nested deeper than {MAX_ARGUMENT_DEPTH}"
                    )));
                }
                if tags.len() >= MAX_ARGUMENT_TAGS {
                    return Err(PolicyError::Arguments(format!(
                        "more than {MAX_ARGUMENT_TAGS} arguments"
                    )));
                }
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                if tags.insert(key, text).is_some() {
                    return Err(PolicyError::Arguments(
                        "two argument keys flatten to the same name".into(),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Whether `v` nests at most `levels` more levels of arrays/objects below itself. Recurses at
/// most `levels` deep.
fn within_depth(v: &Value, levels: usize) -> bool {
    let children: Box<dyn Iterator<Item = &Value>> = match v {
        Value::Array(a) => Box::new(a.iter()),
        Value::Object(m) => Box::new(m.values()),
        _ => return true,
    };
    let mut children = children.peekable();
    if children.peek().is_none() {
        return true;
    }
    levels > 0 && children.all(|c| within_depth(c, levels - 1))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]
    use super::*;
    use serde_json::json;

    fn engine() -> PolicyEngine {
        let demo = include_str!("../../../policy/demo.cedar");
        PolicyEngine::new(&[("demo.cedar".into(), demo.into())]).unwrap()
    }

    #[test]
    fn each_schema_text_is_its_own_schema_when_cached() {
        // A schema with an extra entity type accepts a policy that sigil's refuses, before
        // and after both were parsed (and cached); a bad schema is refused every time.
        let extra = format!("{SCHEMA}\nentity Camera;\n");
        let files = [(
            "p.cedar".to_string(),
            "permit (principal, action == Action::\"invoke\", resource) when { principal is Camera };"
                .to_string(),
        )];
        for _ in 0..2 {
            assert!(matches!(
                PolicyEngine::new(&files),
                Err(PolicyError::Invalid(_))
            ));
            assert!(PolicyEngine::with_schema(&extra, &files).is_ok());
            assert!(matches!(
                PolicyEngine::with_schema("entity ;", &files),
                Err(PolicyError::Schema(_))
            ));
        }
    }

    #[test]
    fn each_policy_text_is_compiled_once_and_decides_as_its_own() {
        // Engines offered the same text at once share one compilation; another text (one
        // character apart) is its own set and decides otherwise; a text that does not
        // validate is refused every time, also when asked for at once.
        let allow = |model: &str| {
            vec![(
                "p.cedar".to_string(),
                format!(
                    "permit (principal, action == Action::\"invoke\", resource == Model::\"{model}\");"
                ),
            )]
        };
        let (a, b) = (allow("compiled-once-a"), allow("compiled-once-b"));
        let engines: Vec<PolicyEngine> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| PolicyEngine::new(&a).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            engines
                .iter()
                .all(|e| Arc::ptr_eq(&e.compiled, &engines[0].compiled))
        );
        let other = PolicyEngine::new(&b).unwrap();
        assert!(!Arc::ptr_eq(&other.compiled, &engines[0].compiled));
        let g = vec!["g".to_string()];
        let ask =
            |e: &PolicyEngine, m: &str| e.decide(&q(&g, "invoke", "Model", m, &[])).unwrap().allow;
        assert!(ask(&engines[3], "compiled-once-a") && !ask(&engines[3], "compiled-once-b"));
        assert!(ask(&other, "compiled-once-b") && !ask(&other, "compiled-once-a"));
        let bad = vec![(
            "p.cedar".to_string(),
            "permit (principal, action == Action::\"invoke\", resource == Nope::\"x\");"
                .to_string(),
        )];
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    assert!(matches!(
                        PolicyEngine::new(&bad),
                        Err(PolicyError::Invalid(_))
                    ))
                });
            }
        });
        assert!(matches!(
            PolicyEngine::new(&bad),
            Err(PolicyError::Invalid(_))
        ));
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
            arguments: None,
            delegation: None,
            risk: None,
        }
    }

    #[test]
    fn risk_reaches_policy_and_unknown_risk_is_the_highest() {
        let engine = PolicyEngine::new(&[(
            "r.cedar".into(),
            "permit (principal, action == Action::\"invoke\", resource == Model::\"m\") \
             when { context.risk.level == \"low\" && context.risk.score < 30 };"
                .into(),
        )])
        .unwrap();
        let groups: Vec<String> = Vec::new();
        let q = |risk: Option<&RiskContext>| {
            let query = Query {
                principal: Principal {
                    spiffe_id: "spiffe://td/a",
                    trust_domain: "td",
                    groups: &groups,
                },
                action: "invoke",
                resource_type: "Model",
                resource_id: "m",
                scopes: &[],
                hour: 1,
                weekday: 1,
                arguments: None,
                delegation: None,
                risk,
            };
            engine.decide(&query).unwrap().allow
        };
        let low = RiskContext {
            level: "low".into(),
            score: 10,
            at: 1,
            node: "spiffe://td/sigil/node/n".into(),
        };
        let high = RiskContext {
            level: "high".into(),
            score: 70,
            ..low.clone()
        };
        assert!(q(Some(&low)));
        assert!(!q(Some(&high)));
        assert!(!q(None));
        // The cached caller parts do not carry one risk into another's decision.
        assert!(q(Some(&low)));
        assert!(!q(Some(&high)));
    }

    #[test]
    fn delegation_reaches_policy_and_is_part_of_the_caller() {
        let text = r#"
            @id("direct-for-clinicians")
            permit (principal, action == Action::"call_tool", resource == Tool::"read_record")
            when { context has delegation && context.delegation.groups.contains("clinicians")
                   && context.delegation.depth == 1
                   && context.delegation.chain.contains("spiffe://td/cam")
                   && context.delegation.user == "alice" };
            @id("act-for") permit (principal, action == Action::"act_for", resource == User::"alice")
            when { context has delegation };
        "#;
        let e = PolicyEngine::new(&[("d.cedar".into(), text.into())]).unwrap();
        let direct = Delegation {
            user: "alice".into(),
            groups: vec!["clinicians".into()],
            chain: vec!["spiffe://td/cam".into()],
        };
        let relayed = Delegation {
            chain: vec!["spiffe://td/cam".into(), "spiffe://td/other".into()],
            ..direct.clone()
        };
        let with = |d: Option<&Delegation>, action, rt, rid| {
            let mut query = q(&[], action, rt, rid, &[]);
            query.delegation = d;
            e.decide(&query).unwrap().allow
        };
        assert!(with(Some(&direct), "call_tool", "Tool", "read_record"));
        // Same caller, another chain: decided again, not recalled from the first answer.
        assert!(!with(Some(&relayed), "call_tool", "Tool", "read_record"));
        assert!(!with(None, "call_tool", "Tool", "read_record"));
        assert!(with(Some(&direct), "call_tool", "Tool", "read_record"));
        assert!(with(Some(&direct), "act_for", "User", "alice"));
        assert!(!with(Some(&direct), "act_for", "User", "bob"));
        assert!(!with(None, "act_for", "User", "alice"));
        // The reference evaluation (with the schema) agrees.
        let mut query = q(&[], "call_tool", "Tool", "read_record", &[]);
        query.delegation = Some(&relayed);
        assert_eq!(
            e.decide(&query).unwrap(),
            e.decide_reference(&query).unwrap()
        );
    }

    #[test]
    fn key_release_needs_decrypt_and_the_node_selectors_the_policy_requires() {
        let policy = r#"
            @id("release-on-secureboot")
            permit (principal == Workload::"spiffe://td/cam", action == Action::"decrypt",
                    resource == Model::"defect-detector")
            when { context.node_selectors.contains("tpm:secureboot:true") };
        "#;
        let e = PolicyEngine::new(&[("r.cedar".into(), policy.into())]).unwrap();
        let sb = vec!["tpm:secureboot:true".to_string()];
        let none: Vec<String> = vec!["join_token:true".to_string()];
        let query = q(&[], "decrypt", "Model", "defect-detector", &[]);
        let d = e
            .decide_release(&query, "defect-detector", 3, "spiffe://td/node", &sb)
            .unwrap();
        assert!(d.allow, "{d:?}");
        assert_eq!(d.policy_ids, ["release-on-secureboot"]);
        assert!(
            !e.decide_release(&query, "defect-detector", 3, "spiffe://td/node", &none)
                .unwrap()
                .allow
        );
        assert!(
            !e.decide_release(&query, "other-model", 3, "spiffe://td/node", &sb)
                .unwrap()
                .allow
        );
        let mut other = query.clone();
        other.principal.spiffe_id = "spiffe://td/intruder";
        assert!(
            !e.decide_release(&other, "defect-detector", 3, "spiffe://td/node", &sb)
                .unwrap()
                .allow
        );
        // The demo policy (invoke permits) grants no decrypt.
        let ff = vec!["factory-floor".to_string()];
        assert!(
            !engine()
                .decide_release(
                    &q(&ff, "decrypt", "Model", "defect-detector", &[]),
                    "defect-detector",
                    1,
                    "spiffe://td/node",
                    &sb
                )
                .unwrap()
                .allow
        );
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
    fn per_caller_parts_and_decisions_are_never_reused_for_another_call() {
        // One permit that depends on every field the per-caller cache is keyed by.
        let policy = r#"
            @id("exact")
            permit (principal == Workload::"spiffe://td/a", action == Action::"invoke", resource == Model::"m")
            when { principal in Group::"g" && principal.trust_domain == "td" &&
                   context.scopes.contains("s") && context.hour == 10 && context.weekday == 1 };
        "#;
        let e = PolicyEngine::new(&[("p.cedar".into(), policy.into())]).unwrap();
        let g = vec!["g".to_string()];
        let h = vec!["h".to_string()];
        let s = vec!["s".to_string()];
        let t = vec!["t".to_string()];
        let base = Query {
            principal: Principal {
                spiffe_id: "spiffe://td/a",
                trust_domain: "td",
                groups: &g,
            },
            action: "invoke",
            resource_type: "Model",
            resource_id: "m",
            scopes: &s,
            hour: 10,
            weekday: 1,
            arguments: None,
            delegation: None,
            risk: None,
        };
        let mut variants = vec![base.clone()];
        let mut v = base.clone();
        v.principal.spiffe_id = "spiffe://td/b";
        variants.push(v);
        let mut v = base.clone();
        v.principal.trust_domain = "other";
        variants.push(v);
        let mut v = base.clone();
        v.principal.groups = &h;
        variants.push(v);
        let mut v = base.clone();
        v.scopes = &t;
        variants.push(v);
        let mut v = base.clone();
        v.hour = 11;
        variants.push(v);
        let mut v = base.clone();
        v.weekday = 2;
        variants.push(v);
        // Same caller, another resource: its decision is not the one remembered for "m".
        let mut v = base.clone();
        v.resource_id = "n";
        variants.push(v);
        // Interleaved twice, so each variant is decided both fresh and from the cache right
        // after the allowed caller.
        for round in 0..2 {
            for (i, v) in variants.iter().enumerate() {
                let allowed = e.decide(&base).unwrap().allow;
                assert!(allowed, "round {round}: the permitted caller is allowed");
                let d = e.decide(v).unwrap();
                assert_eq!(d.allow, i == 0, "round {round}, variant {i}");
                assert_eq!(d, e.decide_reference(v).unwrap(), "variant {i}");
            }
        }
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
        // getTag without hasTag does not validate (strict mode).
        let unguarded = "forbid(principal, action == Action::\"call_tool\", resource) when { context.arguments.getTag(\"path\") == \"/\" };";
        assert!(matches!(
            PolicyEngine::new(&[("t.cedar".into(), unguarded.into())]),
            Err(PolicyError::Invalid(_))
        ));
        // Templates are refused rather than silently ignored.
        let template = "permit(principal == ?principal, action == Action::\"invoke\", resource);";
        assert!(matches!(
            PolicyEngine::new(&[("t.cedar".into(), template.into())]),
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
    fn unknown_actions_and_mismatched_resource_types_are_errors() {
        let text = "permit(principal, action, resource);";
        let e = PolicyEngine::new(&[("p.cedar".into(), text.into())]).unwrap();
        let g = vec![];
        assert!(e.decide(&q(&g, "invoke", "Model", "m", &[])).unwrap().allow);
        assert!(e.decide(&q(&g, "invok", "Model", "m", &[])).is_err());
        assert!(e.decide(&q(&g, "invoke", "Tool", "m", &[])).is_err());
        assert!(e.decide(&q(&g, "invoke", "Nope", "m", &[])).is_err());
        assert!(
            e.decide_reference(&q(&g, "invok", "Model", "m", &[]))
                .is_err()
        );
        assert!(
            e.decide_reference(&q(&g, "invoke", "Tool", "m", &[]))
                .is_err()
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

    const TOOL_POLICIES: &str = r#"
        @id("tools") permit(principal, action == Action::"call_tool", resource);
        @id("no-etc") forbid(principal, action == Action::"call_tool", resource == Tool::"read_file")
            when { context.arguments.hasTag("path") && context.arguments.getTag("path") like "/etc/*" };
        @id("no-force") forbid(principal, action == Action::"call_tool", resource)
            when { context.arguments.hasTag("options.force") && context.arguments.getTag("options.force") == "true" };
        @id("needs-path") forbid(principal, action == Action::"call_tool", resource == Tool::"read_file")
            unless { context.arguments.hasTag("path") };
    "#;

    fn call(e: &PolicyEngine, tool: &str, args: &Value) -> Result<Decision, PolicyError> {
        let g = vec![];
        let mut query = q(&g, "call_tool", "Tool", tool, &[]);
        query.arguments = Some(args);
        let d = e.decide(&query);
        // The fast path agrees with the schema-checked reference, errors included.
        match (&d, e.decide_reference(&query)) {
            (Ok(a), Ok(b)) => assert_eq!(*a, b),
            (Err(_), Err(_)) => {}
            (a, b) => panic!("decide {a:?} but reference {b:?}"),
        }
        d
    }

    #[test]
    fn arguments_allowed_and_forbidden_values() {
        let e = PolicyEngine::new(&[("t.cedar".into(), TOOL_POLICIES.into())]).unwrap();
        let d = call(&e, "read_file", &json!({"path": "/data/x.csv"})).unwrap();
        assert!(d.allow);
        assert_eq!(d.policy_ids, ["tools"]);
        let d = call(&e, "read_file", &json!({"path": "/etc/shadow"})).unwrap();
        assert!(!d.allow);
        assert_eq!(d.policy_ids, ["no-etc"]);
        // The same value on another tool is fine.
        assert!(
            call(&e, "write_file", &json!({"path": "/etc/x"}))
                .unwrap()
                .allow
        );
    }

    #[test]
    fn arguments_missing_tag() {
        let e = PolicyEngine::new(&[("t.cedar".into(), TOOL_POLICIES.into())]).unwrap();
        let d = call(&e, "read_file", &json!({"file": "/etc/shadow"})).unwrap();
        assert!(!d.allow);
        assert_eq!(d.policy_ids, ["needs-path"]);
        assert!(d.errors.is_empty());
        // No arguments at all (and `null`) is an empty entity: no tag, no error.
        assert!(!call(&e, "read_file", &Value::Null).unwrap().allow);
        assert!(call(&e, "sensor", &Value::Null).unwrap().allow);
        let g = vec![];
        assert!(
            e.decide(&q(&g, "call_tool", "Tool", "sensor", &[]))
                .unwrap()
                .allow
        );
    }

    #[test]
    fn arguments_nested_keys_and_value_texts() {
        let e = PolicyEngine::new(&[("t.cedar".into(), TOOL_POLICIES.into())]).unwrap();
        let d = call(&e, "rm", &json!({"options": {"force": true}})).unwrap();
        assert!(!d.allow);
        assert_eq!(d.policy_ids, ["no-force"]);
        assert!(
            call(&e, "rm", &json!({"options": {"force": false}}))
                .unwrap()
                .allow
        );
        let mut tags = argument_tags(Some(&json!({
            "s": "x", "n": 1.5, "i": -3, "b": true, "z": null, "a": [1, "two", {"k": null}],
            "o": {"p": {"q": "deep"}, "e": {}}
        })))
        .unwrap();
        tags.sort();
        let want: Vec<(String, String)> = [
            ("a", r#"[1,"two",{"k":null}]"#),
            ("b", "true"),
            ("i", "-3"),
            ("n", "1.5"),
            ("o.e", "{}"),
            ("o.p.q", "deep"),
            ("s", "x"),
            ("z", "null"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(tags, want);
    }

    #[test]
    fn arguments_over_limits_are_errors_so_denied() {
        let e = PolicyEngine::new(&[("t.cedar".into(), TOOL_POLICIES.into())]).unwrap();
        let many: serde_json::Map<String, Value> = (0..=MAX_ARGUMENT_TAGS)
            .map(|i| (format!("k{i}"), json!(i)))
            .collect();
        assert!(matches!(
            call(&e, "sensor", &Value::Object(many)),
            Err(PolicyError::Arguments(_))
        ));
        let ok: serde_json::Map<String, Value> = (0..MAX_ARGUMENT_TAGS)
            .map(|i| (format!("k{i}"), json!(i)))
            .collect();
        assert!(call(&e, "sensor", &Value::Object(ok)).unwrap().allow);

        let long = "k".repeat(MAX_ARGUMENT_KEY_BYTES + 1);
        assert!(call(&e, "sensor", &json!({ long: 1 })).is_err());
        let nested_long = json!({ "a".repeat(200): { "b".repeat(100): 1 } });
        assert!(call(&e, "sensor", &nested_long).is_err());
        assert!(
            call(
                &e,
                "sensor",
                &json!({ "k".repeat(MAX_ARGUMENT_KEY_BYTES): 1 })
            )
            .is_ok()
        );

        // 8 levels is fine, 9 is not, whether objects or arrays.
        let mut v = json!(1);
        for _ in 0..MAX_ARGUMENT_DEPTH {
            v = json!({ "k": v });
        }
        assert!(call(&e, "sensor", &json!({ "k": v.clone() })).is_err());
        assert!(call(&e, "sensor", &v).unwrap().allow);
        let mut a = json!(1);
        for _ in 0..MAX_ARGUMENT_DEPTH - 1 {
            a = json!([a]);
        }
        assert!(call(&e, "sensor", &json!({ "k": a.clone() })).is_ok());
        assert!(call(&e, "sensor", &json!({ "k": [a] })).is_err());
        // A very deep value is refused without recursing through it.
        let mut deep = json!(1);
        for _ in 0..120 {
            deep = json!([deep]);
        }
        assert!(argument_tags(Some(&json!({ "k": deep }))).is_err());

        assert!(call(&e, "sensor", &json!({"a.b": 1, "a": {"b": 2}})).is_err());
        assert!(call(&e, "sensor", &json!([1, 2])).is_err());
        assert!(call(&e, "sensor", &json!("path")).is_err());
    }

    /// A small deterministic PRNG (SplitMix64).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
            &xs[self.below(xs.len())]
        }
        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
    }

    const ACTIONS: [(&str, &str); 6] = [
        ("invoke", "Model"),
        ("list_models", "Endpoint"),
        ("call_tool", "Tool"),
        ("list_tools", "Endpoint"),
        ("mcp", "Endpoint"),
        ("http", "Endpoint"),
    ];

    fn gen_policy(r: &mut Rng, n: usize) -> String {
        let effect = if r.chance(25) { "forbid" } else { "permit" };
        let principal = match r.below(4) {
            0 | 1 => "principal".to_owned(),
            2 => format!("principal in Group::\"g{}\"", r.below(4)),
            _ => format!("principal == Workload::\"w{}\"", r.below(3)),
        };
        let (action, rtype) = match r.below(4) {
            0 => ("action".to_owned(), None),
            1 | 2 => {
                let (a, t) = *r.pick(&ACTIONS);
                (format!("action == Action::\"{a}\""), Some(t))
            }
            _ => {
                let (a, _) = *r.pick(&ACTIONS);
                let (b, _) = *r.pick(&ACTIONS);
                (
                    format!("action in [Action::\"{a}\", Action::\"{b}\"]"),
                    None,
                )
            }
        };
        let rtype = rtype.unwrap_or_else(|| r.pick(&ACTIONS).1);
        let resource = match r.below(6) {
            0 => "resource".to_owned(),
            1..=3 => format!("resource == {rtype}::\"r{}\"", r.below(4)),
            4 => format!("resource is {rtype}"),
            _ => format!("resource in {rtype}::\"r{}\"", r.below(4)),
        };
        let cond = match r.below(7) {
            0 | 1 => String::new(),
            2 => format!("when {{ context.scopes.contains(\"s{}\") }}", r.below(3)),
            3 => format!("unless {{ context.hour < {} }}", r.below(24)),
            4 => format!(
                "when {{ context.arguments.hasTag(\"k{0}\") && context.arguments.getTag(\"k{0}\") == \"v{1}\" }}",
                r.below(3),
                r.below(3)
            ),
            // Errors (overflow) must show up the same in both evaluations.
            5 => "when { context.hour + 9223372036854775800 > 0 }".to_owned(),
            _ => format!("when {{ principal.trust_domain == \"td{}\" }}", r.below(2)),
        };
        format!("@id(\"p{n}\") {effect}({principal}, {action}, {resource}) {cond};\n")
    }

    #[test]
    fn sliced_decisions_equal_unsliced_ones() {
        let mut r = Rng(0x5EED);
        let (mut cases, mut allowed, mut sets) = (0, 0, 0);
        while sets < 150 {
            let n = 1 + r.below(40);
            let text: String = (0..n).map(|i| gen_policy(&mut r, i)).collect();
            // Some generated sets do not validate (e.g. `resource is Tool` on invoke): skip.
            let Ok(e) = PolicyEngine::new(&[("gen.cedar".into(), text.clone())]) else {
                continue;
            };
            sets += 1;
            for _ in 0..25 {
                let groups: Vec<String> = (0..4)
                    .filter(|_| r.chance(40))
                    .map(|g| format!("g{g}"))
                    .collect();
                let scopes: Vec<String> = (0..3)
                    .filter(|_| r.chance(50))
                    .map(|s| format!("s{s}"))
                    .collect();
                let (action, mut rtype) = *r.pick(&ACTIONS);
                if r.chance(3) {
                    rtype = r.pick(&ACTIONS).1;
                }
                let rid = format!("r{}", r.below(5));
                let spiffe = format!("w{}", r.below(4));
                let td = format!("td{}", r.below(2));
                let mut args = serde_json::Map::new();
                for k in 0..3 {
                    if r.chance(50) {
                        args.insert(format!("k{k}"), json!(format!("v{}", r.below(3))));
                    }
                }
                let args = Value::Object(args);
                let query = Query {
                    principal: Principal {
                        spiffe_id: &spiffe,
                        trust_domain: &td,
                        groups: &groups,
                    },
                    action,
                    resource_type: rtype,
                    resource_id: &rid,
                    scopes: &scopes,
                    hour: r.below(24) as i64,
                    weekday: r.below(7) as i64,
                    arguments: Some(&args),
                    delegation: None,
                    risk: None,
                };
                match (e.decide(&query), e.decide_reference(&query)) {
                    (Ok(a), Ok(b)) => {
                        assert_eq!(a, b, "policies:\n{text}\nquery: {query:?}");
                        allowed += usize::from(a.allow);
                    }
                    (Err(_), Err(_)) => {}
                    (a, b) => panic!("decide {a:?} but reference {b:?}\n{text}\n{query:?}"),
                }
                cases += 1;
            }
        }
        assert!(cases >= 3000);
        // The generator exercises both outcomes.
        assert!(
            allowed > cases / 20 && allowed < cases - cases / 20,
            "{allowed}/{cases}"
        );
    }

    #[test]
    fn slices_hold_only_what_can_match() {
        let text = r#"
            @id("a") permit(principal, action == Action::"invoke", resource == Model::"m1");
            @id("b") permit(principal, action == Action::"invoke", resource == Model::"m2");
            @id("c") permit(principal, action == Action::"invoke", resource);
            @id("d") permit(principal, action in [Action::"call_tool", Action::"invoke"], resource);
            @id("e") forbid(principal, action, resource);
        "#;
        let e = PolicyEngine::new(&[("p.cedar".into(), text.into())]).unwrap();
        let ids = |s: &PolicySet| {
            let mut v: Vec<String> = s.policies().map(|p| p.id().to_string()).collect();
            v.sort();
            v
        };
        let invoke = &e.compiled.actions["invoke"];
        let m1 = EntityUid::from_str(r#"Model::"m1""#).unwrap();
        assert_eq!(ids(&invoke.by_resource[&m1]), ["a", "c", "d", "e"]);
        assert_eq!(ids(&invoke.fallback), ["c", "d", "e"]);
        assert_eq!(ids(&e.compiled.actions["call_tool"].fallback), ["d", "e"]);
        assert_eq!(ids(&e.compiled.actions["http"].fallback), ["e"]);
        assert!(e.compiled.action_entities.is_empty());
    }
}
