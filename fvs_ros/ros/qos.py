"""Service QoS of the node and of its clients (no node here: the CLI and the bag evaluator use it).

A service client keeps the replies it has not taken yet in a history of its own, and rclpy's
default (qos_profile_services_default) keeps 10: a client with more requests in flight loses the
replies beyond 10 that arrive together, which is what the node's immediate `busy` refusals do
(measured: 10 processes x 20 asks at once, max_pending_questions 20: clients with depth 10 got 84
of their 100 replies, clients with depth 100 got 100 of 100; the node sent all 200). CLIENT_QOS
keeps every reply; a client of the node that has more than 10 requests in flight needs it (or a
depth of at least its requests in flight)."""

from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

# The node's services: requests wait here until an executor thread takes them (the default depth of
# 10 lost bursts of 20); bounded, so a flood of requests cannot grow the node's memory.
SERVICE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=256, reliability=ReliabilityPolicy.RELIABLE)
# The project's clients: no reply is ever replaced by a later one before it is taken.
CLIENT_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
