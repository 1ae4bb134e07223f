"""Second process for the interface tests: echoes Activations, serves Generate and its action."""
import sys
import threading
import time

import rclpy
from rclpy.action import ActionServer
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

from mdi_llm_ros.action import Generate as GenerateAction
from mdi_llm_ros.msg import Activation
from mdi_llm_ros.nodes.common import RING_QOS
from mdi_llm_ros.srv import Generate


def main():
    rclpy.init()
    node = rclpy.create_node("interface_peer")
    group = ReentrantCallbackGroup()
    pub = node.create_publisher(Activation, "/itest/back", RING_QOS)
    node.create_subscription(Activation, "/itest/out", pub.publish, RING_QOS, callback_group=group)

    def on_generate(req, resp):
        words = req.prompt.split()
        resp.success = True
        resp.text = " ".join(reversed(words))
        resp.prompt_tokens = len(words)
        resp.generated_tokens = min(len(words), req.max_new_tokens)
        resp.finish_reason = "length"
        return resp

    def execute(goal_handle):
        words = goal_handle.request.prompt.split()
        for i, w in enumerate(words):
            fb = GenerateAction.Feedback()
            fb.text, fb.token_id, fb.token_count = (w if i == 0 else " " + w), i, i + 1
            goal_handle.publish_feedback(fb)
            time.sleep(0.02)
        goal_handle.succeed()
        res = GenerateAction.Result()
        res.success, res.text, res.generated_tokens, res.finish_reason = True, " ".join(words), len(words), "eos"
        return res

    node.create_service(Generate, "/itest/generate", on_generate, callback_group=group)
    ActionServer(node, GenerateAction, "/itest/generate_stream", execute, callback_group=group)
    print("peer ready", flush=True)
    ex = MultiThreadedExecutor(num_threads=4)
    ex.add_node(node)
    timer = threading.Timer(float(sys.argv[1]) if len(sys.argv) > 1 else 60, ex.shutdown)
    timer.daemon = True            # a bounded lifetime, in case the test dies first
    timer.start()
    try:
        ex.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()
