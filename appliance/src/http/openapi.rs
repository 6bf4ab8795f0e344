//! The control API's OpenAPI document: its info and bearer security scheme (the paths come
//! from the handlers' `#[utoipa::path]`), and the links between operations.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "DR appliance control API",
        description = "Protected items and their lifecycle (enable, test failover, failover, \
                       change point, commit, re-protect, failback, resync, disable), slots, \
                       jobs, recovery points. Everything but /health and /openapi.json needs \
                       `Authorization: Bearer <token>` (DATA_DIR/api-token)."
    ),
    modifiers(&BearerScheme)
)]
pub(super) struct ApiDoc;

pub(super) struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// OpenAPI links between operations, so that a client (or a schema-driven fuzzer) can follow
/// enable → the item → its operations → their jobs with the ids the answers carry.
pub(super) fn add_links(document: &mut serde_json::Value) {
    use serde_json::json;
    let link =
        |operation: &str, id: &str| json!({"operationId": operation, "parameters": {"id": id}});
    let item_operations = [
        ("GetItem", "get_item"),
        ("ListPoints", "list_points"),
        ("TestFailover", "test_failover"),
        ("Failover", "failover"),
        ("Resync", "resync"),
        ("Failback", "failback"),
        ("Disable", "disable"),
        ("CreateExport", "create_export"),
    ];
    let from_item = |id: &str| -> serde_json::Map<String, serde_json::Value> {
        item_operations
            .iter()
            .map(|(name, operation)| ((*name).to_owned(), link(operation, id)))
            .collect()
    };
    let mut links: Vec<(&str, &str, &str, serde_json::Map<String, serde_json::Value>)> = Vec::new();
    for path in ["/v1/items", "/v1/items/{id}/reprotect"] {
        let mut map = from_item("$response.body#/item/id");
        map.insert("GetJob".into(), link("get_job", "$response.body#/job/id"));
        links.push((path, "post", "201", map));
    }
    let mut item = from_item("$response.body#/id");
    item.remove("GetItem");
    for (name, operation) in [
        ("ChangePoint", "change_point"),
        ("Commit", "commit"),
        ("TestFailoverCleanup", "test_failover_cleanup"),
    ] {
        item.insert(name.into(), link(operation, "$response.body#/id"));
    }
    links.push(("/v1/items/{id}", "get", "200", item));
    for (path, extra) in [
        (
            "/v1/items/{id}/test-failover",
            &[("TestFailoverCleanup", "test_failover_cleanup")][..],
        ),
        (
            "/v1/items/{id}/failover",
            &[("ChangePoint", "change_point"), ("Commit", "commit")][..],
        ),
        ("/v1/items/{id}/change-point", &[("Commit", "commit")][..]),
        ("/v1/items/{id}/failback", &[][..]),
        ("/v1/items/{id}/resync", &[][..]),
    ] {
        let mut map = serde_json::Map::new();
        map.insert("GetJob".into(), link("get_job", "$response.body#/id"));
        map.insert("GetItem".into(), link("get_item", "$response.body#/item"));
        for (name, operation) in extra {
            map.insert((*name).into(), link(operation, "$response.body#/item"));
        }
        links.push((path, "post", "202", map));
    }
    let mut commit = serde_json::Map::new();
    commit.insert("Reprotect".into(), link("reprotect", "$response.body#/id"));
    commit.insert("Disable".into(), link("disable", "$response.body#/id"));
    links.push(("/v1/items/{id}/commit", "post", "200", commit));
    let mut job = serde_json::Map::new();
    job.insert("GetItem".into(), link("get_item", "$response.body#/item"));
    links.push(("/v1/jobs/{id}", "get", "200", job));
    let export_link = |operation: &str| {
        json!({"operationId": operation, "parameters": {"export_id": "$response.body#/id"}})
    };
    let mut export = serde_json::Map::new();
    export.insert("GetExport".into(), export_link("get_export"));
    export.insert("RemoveExport".into(), export_link("remove_export"));
    export.insert("GetItem".into(), link("get_item", "$response.body#/item"));
    links.push(("/v1/items/{id}/exports", "post", "201", export));
    for (path, method, status, map) in links {
        if let Some(response) = document
            .pointer_mut(&format!(
                "/paths/{}/{method}/responses/{status}",
                path.replace('/', "~1")
            ))
            .and_then(serde_json::Value::as_object_mut)
        {
            response.insert("links".into(), serde_json::Value::Object(map));
        }
    }
}
