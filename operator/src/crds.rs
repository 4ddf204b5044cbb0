//! `tessera-operator crds apply`: the chart's pre-install/pre-upgrade hook. Helm installs the CRDs in a
//! chart's `crds/` once and never updates them; this applies the CRDs this binary was built with (server-side
//! apply, so fields others manage stay), with the CEL rules where the API server enforces them (1.25+).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;

use crate::controller::FIELD_MANAGER;
use crate::Error;

/// Apply every Tessera CRD; returns what was applied (`name (with CEL rules)`), for the hook's log.
pub async fn apply(client: &Client) -> Result<Vec<String>, Error> {
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| Error::kube("read the API server's version".into(), e))?;
    let cel = tessera_crds::server_enforces_cel(&version.major, &version.minor);
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut done = Vec::new();
    for (_, crd) in tessera_crds::definitions(cel) {
        let name = crd["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .map_err(|e| Error::kube(format!("apply CustomResourceDefinition {name}"), e))?;
        tracing::info!(crd = %name, cel, server = %format!("{}.{}", version.major, version.minor), "CRD applied");
        done.push(if cel {
            format!("{name} (with CEL rules)")
        } else {
            format!(
                "{name} (without CEL rules: the server is {}.{})",
                version.major, version.minor
            )
        });
    }
    Ok(done)
}
