from classify_server.grpc_server.server import main

main()
