"""ROS-free core of mdi_llm_ros: config, planning, chunk execution, sampling,
scheduling and the tensor codec. Nothing in here imports rclpy, so all of it is
tested with plain pytest and reused by the ROS nodes, the launcher and the CLI.
"""
