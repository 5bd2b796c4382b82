"""The ROS 2 side: the lifecycle node, image intake and conversion, parameters, the Ask action
server, diagnostics and the memory file. Holds no model math; the engine (fvs_ros.engine) holds no
ROS."""
