"""ros2 launch mdi_llm_ros cluster.launch.py [config:=FILE] [host:=NAME] [respawn:=true] [autostart:=false]

Starts the ring's nodes that the config assigns to `host` (every node when
empty). A thin wrapper: which nodes run, and with which parameters, comes
from mdi_llm_ros.launcher.node_specs, the same function `mdi-llm cluster` uses.
The nodes are managed (lifecycle) nodes; they bring themselves to active unless
autostart:=false, which leaves them unconfigured for a lifecycle manager.
"""
import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _default_config() -> str:
    from ament_index_python.packages import get_package_share_directory
    return os.path.join(get_package_share_directory("mdi_llm_ros"), "config", "cluster.yaml")


def _nodes(context, *args, **kwargs):
    from mdi_llm_ros.launcher import node_specs
    config = LaunchConfiguration("config").perform(context) or _default_config()
    if not os.path.isfile(config):
        raise RuntimeError(f"config:={config} does not exist; give config:= the path of a cluster config YAML")
    host = LaunchConfiguration("host").perform(context) or None
    respawn = LaunchConfiguration("respawn").perform(context).lower() in ("1", "true", "yes")
    autostart = LaunchConfiguration("autostart", default="true").perform(context).lower() not in ("0", "false", "no")
    return [
        Node(package="mdi_llm_ros", executable=spec.executable, name=spec.name, output="screen",
             parameters=[spec.parameters], additional_env=spec.env,   # the config's discovery settings
             respawn=respawn and spec.role == "chunk", respawn_delay=1.0)
        for spec in node_specs(config, host, autostart=autostart)
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("config", default_value="", description="cluster config YAML (default: the package's)"),
        DeclareLaunchArgument("host", default_value="", description="start only the nodes assigned to this host"),
        DeclareLaunchArgument("respawn", default_value="false", description="restart chunk nodes that die"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="bring every node to active; false: leave them unconfigured"),
        OpaqueFunction(function=_nodes),
    ])
