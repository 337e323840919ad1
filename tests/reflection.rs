//! Server reflection v1 (what current grpcurl, Postman and grpc-cli speak; the grpcurl test
//! covers v1alpha): the services are listed and the contract can be fetched whole.
mod common;

use ccgw_callcontrol::proto::FILE_DESCRIPTOR_SET;
use common::spawn_app;
use prost::Message;
use tokio_stream::StreamExt;
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

async fn ask(addr: std::net::SocketAddr, request: MessageRequest) -> MessageResponse {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let requests = tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let mut answers = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    answers
        .next()
        .await
        .expect("one answer")
        .unwrap()
        .message_response
        .expect("a response")
}

#[tokio::test]
async fn reflection_v1_lists_the_services_and_serves_the_contract() {
    let app = spawn_app().await;
    let MessageResponse::ListServicesResponse(list) =
        ask(app.grpc_addr, MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for service in [
        "ccgw.callcontrol.v1.CallControl",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.contains(&service), "{service} missing from {names:?}");
    }

    let MessageResponse::FileDescriptorResponse(files) = ask(
        app.grpc_addr,
        MessageRequest::FileContainingSymbol("ccgw.callcontrol.v1.CallControl".into()),
    )
    .await
    else {
        panic!("not a file descriptor");
    };
    let served: Vec<prost_types::FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .collect();
    let contract = served
        .iter()
        .find(|f| f.package() == "ccgw.callcontrol.v1")
        .expect("the contract's file");
    let built = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
    assert_eq!(
        Some(contract),
        built.file.iter().find(|f| f.name() == contract.name()),
        "reflection serves the contract the binary was built from"
    );
    let methods: Vec<_> = contract.service[0]
        .method
        .iter()
        .map(|m| m.name())
        .collect();
    assert_eq!(methods, ["ReleaseCall", "WatchReleaseEvents"]);
}
