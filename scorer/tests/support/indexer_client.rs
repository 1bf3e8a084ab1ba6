//! A tonic client for `indexer.v1.IndexerService`, hand-written as
//! `tonic-build` would generate it (there is no protoc): what an llm-d
//! endpoint picker configured with a remote indexer sends.

use scorer::indexer_api::{GET_POD_SCORES_PATH, GetPodScoresRequest, PodScore};
use std::net::SocketAddr;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

pub struct IndexerClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl IndexerClient {
    pub async fn connect(addr: SocketAddr) -> IndexerClient {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect the indexer API");
        IndexerClient {
            grpc: tonic::client::Grpc::new(channel),
        }
    }

    /// Any gRPC method path with a `GetPodScoresRequest` (to probe unknown ones).
    pub async fn call(
        &mut self,
        path: &'static str,
        req: GetPodScoresRequest,
    ) -> Result<Vec<PodScore>, tonic::Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let codec = tonic_prost::ProstCodec::<
            GetPodScoresRequest,
            scorer::indexer_api::GetPodScoresResponse,
        >::default();
        let reply = self
            .grpc
            .unary(
                tonic::Request::new(req),
                PathAndQuery::from_static(path),
                codec,
            )
            .await?;
        Ok(reply.into_inner().scores)
    }

    pub async fn get_pod_scores(
        &mut self,
        prompt: &str,
        model: &str,
        pods: &[&str],
    ) -> Result<Vec<PodScore>, tonic::Status> {
        let req = GetPodScoresRequest {
            prompt: prompt.to_owned(),
            model_name: model.to_owned(),
            pod_identifiers: pods.iter().map(|p| p.to_string()).collect(),
        };
        self.call(GET_POD_SCORES_PATH, req).await
    }
}
