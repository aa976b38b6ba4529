//! The control API's OpenAPI 3 document, served at `/v1/openapi.json`. It is generated: its
//! paths from the route table ([`super::routes`], which also builds the router), its schemas
//! from the wire types (`pgwarden_api`, which derives them with its `openapi` feature). Nothing
//! here is written beside the code it describes.

use axum::Json;
use pgwarden_api::control::{
    Backup, BackupKind, BackupOperation, BackupStats, BackupStatus, ChangeDatabase, ClientLimits,
    Connections, Container, CreateDatabase, CreateUser, Database, DatabaseOperation,
    DatabaseStatus, DiskStats, Engine, EngineUpgrade, Env, Event, Lag, Node, NodeRole, NodeSeries,
    NodeStats, Operation, OperationStatus, PitrWindow, Plan, SetLimits, SetTls, SizeStats, Stats,
    StatsHistory, TlsSettings, Usage, User, UserWithPassword,
};
use pgwarden_api::{ApiError, ApiErrorBody};
use utoipa::openapi::path::{
    HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ArrayBuilder, ContentBuilder, ObjectBuilder, OpenApi as Document, PathsBuilder, Ref, RefOr,
    Required, ResponseBuilder, Schema, Type,
};
use utoipa::OpenApi;

use super::{Body, Route};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "pgwarden control API",
        description = "Managed PostgreSQL: databases, plans, engines, users, TLS, failover, \
                       backups, point-in-time recovery, stats. Errors are \
                       {\"error\": {\"code\", \"message\"}} with the status that fits."
    ),
    components(schemas(
        Backup,
        BackupKind,
        BackupOperation,
        BackupStats,
        BackupStatus,
        ChangeDatabase,
        ClientLimits,
        Connections,
        Container,
        CreateDatabase,
        CreateUser,
        Database,
        DatabaseOperation,
        DatabaseStatus,
        DiskStats,
        Engine,
        EngineUpgrade,
        Env,
        Event,
        Lag,
        Node,
        NodeRole,
        NodeSeries,
        NodeStats,
        Operation,
        OperationStatus,
        PitrWindow,
        Plan,
        SetLimits,
        SetTls,
        SizeStats,
        Stats,
        StatsHistory,
        TlsSettings,
        Usage,
        User,
        UserWithPassword,
        ApiError,
        ApiErrorBody
    ))
)]
struct Schemas;

const BEARER: &str = "bearer";

fn http_method(method: &axum::http::Method) -> HttpMethod {
    match method.as_str() {
        "POST" => HttpMethod::Post,
        "PUT" => HttpMethod::Put,
        "PATCH" => HttpMethod::Patch,
        "DELETE" => HttpMethod::Delete,
        _ => HttpMethod::Get,
    }
}

fn schema(body: Body) -> Option<RefOr<Schema>> {
    match body {
        Body::None | Body::Bytes(_) => None,
        Body::Schema(name) => Some(Ref::from_schema_name(name).into()),
        Body::ArrayOf(name) => {
            Some(ArrayBuilder::new().items(Ref::from_schema_name(name)).build().into())
        }
        Body::Json => Some(ObjectBuilder::new().schema_type(Type::Object).build().into()),
    }
}

fn media(body: Body) -> &'static str {
    match body {
        Body::Bytes(media) => media,
        _ => "application/json",
    }
}

fn content(body: Body) -> utoipa::openapi::Content {
    let mut content = ContentBuilder::new();
    if let Some(schema) = schema(body) {
        content = content.schema(Some(schema));
    }
    content.build()
}

/// The path's `{parameters}`.
fn parameters(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
}

fn operation(route: &Route) -> utoipa::openapi::path::Operation {
    let (status, body) = route.response;
    let mut success = ResponseBuilder::new().description(route.summary);
    if !matches!(body, Body::None) {
        success = success.content(media(body), content(body));
    }
    let error = ResponseBuilder::new()
        .description("The request was refused or failed: the code and a sentence say why")
        .content("application/json", content(Body::Schema("ApiError")));
    let mut op = OperationBuilder::new()
        .summary(Some(route.summary))
        .operation_id(Some(format!("{} {}", route.method, route.path)))
        .response(status.to_string(), success)
        .response("default", error);
    for name in parameters(route.path) {
        op = op.parameter(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
        );
    }
    if !matches!(route.request, Body::None) {
        op = op.request_body(Some(
            RequestBodyBuilder::new()
                .content(media(route.request), content(route.request))
                .required(Some(Required::True))
                .build(),
        ));
    }
    if !route.public {
        op = op.security(SecurityRequirement::new::<_, _, &str>(BEARER, []));
    }
    op.build()
}

/// The document, for the routes of [`super::routes`].
pub fn document() -> Document {
    let mut doc = Schemas::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut paths = PathsBuilder::new();
    for route in super::routes() {
        paths =
            paths.path(route.path, PathItem::new(http_method(&route.method), operation(&route)));
    }
    doc.paths = paths.build();
    if let Some(components) = doc.components.as_mut() {
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
    doc
}

pub async fn serve() -> Json<Document> {
    Json(document())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route the router has (it is built from the same table, and no route is added
    /// beside it: `api/mod.rs` names no path outside [`super::super::routes`]) is in the
    /// document with its method, parameters and security; every schema it names exists.
    #[test]
    fn every_route_is_documented_and_every_schema_it_names_exists() {
        let doc = serde_json::to_value(document()).unwrap();
        let routes = super::super::routes();
        assert!(routes.len() >= 30);
        for route in &routes {
            let method = route.method.as_str().to_lowercase();
            let op = &doc["paths"][route.path][&method];
            assert!(op.is_object(), "{} {} is not in the document", route.method, route.path);
            let params: Vec<&str> = op["parameters"]
                .as_array()
                .map(|p| p.iter().map(|p| p["name"].as_str().unwrap()).collect())
                .unwrap_or_default();
            assert_eq!(params, parameters(route.path).collect::<Vec<_>>(), "{}", route.path);
            assert_eq!(op["security"].is_array(), !route.public, "{} {}", route.method, route.path);
        }
        let documented: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|item| item.as_object().unwrap().len())
            .sum();
        assert_eq!(documented, routes.len(), "one operation per route");
        // Every schema reference resolves.
        let text = doc.to_string();
        for reference in text.split("\"#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap();
            assert!(doc["components"]["schemas"][name].is_object(), "no schema {name}");
        }
        assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
        // The router's source adds no route beside the table.
        let source = include_str!("mod.rs");
        let beside = source.lines().filter(|l| l.contains(".route(\"")).count();
        assert_eq!(beside, 0, "routes must come from routes(), the document's source");
    }
}
