"""Loads proto/hopper/delegation/v1/service_config.json into a real grpcio channel and shows
that grpcio applies it: a plain channel fails at once with UNAVAILABLE while no server runs,
a channel with the config waits for the server (waitForReady) that starts a second later and
gets its answer.

usage: python3 grpcio_service_config.py CONFIG_JSON SERVER_BINARY SCRATCH_DIR
"""
import subprocess
import sys
import threading
import time

import grpc

config_path, server, scratch = sys.argv[1:4]
target = "127.0.0.1:50053"
method = "/hopper.delegation.v1.TaskService/GetTask"
get_task_t = b"\n\x01t"  # GetTaskRequest { id: "t" }, encoded by hand: no generated code needed


def call(channel):
    stub = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        stub(get_task_t, timeout=20)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


with open(config_path) as f:
    config = f.read()

plain = grpc.insecure_channel(target)
started = time.monotonic()
code = call(plain)
assert code == grpc.StatusCode.UNAVAILABLE, code
assert time.monotonic() - started < 5, "a plain channel fails at once"

processes = []


def start_server():
    time.sleep(1)
    processes.append(subprocess.Popen(
        [server, "serve", "--listen", target, "--database-url", f"sqlite://{scratch}/grpcio.db"],
        stderr=subprocess.DEVNULL,
    ))


threading.Thread(target=start_server).start()
started = time.monotonic()
configured = grpc.insecure_channel(target, options=[("grpc.service_config", config)])
try:
    code = call(configured)
finally:
    time.sleep(1.5)
    for process in processes:
        process.terminate()
        process.wait()
# The call waited for the server, reached it, and got its answer: task t does not exist.
assert code == grpc.StatusCode.NOT_FOUND, code
print(f"grpcio applied the service config: the call waited {time.monotonic() - started:.1f}s "
      "for the server and got NOT_FOUND from it")
