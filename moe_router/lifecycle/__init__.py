"""Expert lifecycle on a Router: merge, split, auto-create, feedback rules, load report, optimize_routing.

Plain numpy + FAISS + torch: no Lightning, no Hydra. Fine-tuning after a change (moe_router.train)
is passed in as a callable where an operation wants one.
"""

from moe_router.lifecycle.create import (
    AutoCreateReport,
    auto_create_by_category,
    auto_create_by_clustering,
    auto_create_experts,
)
from moe_router.lifecycle.feedback import (
    FeedbackStats,
    Recommendation,
    RecommendationRules,
    feedback_stats,
    nearest_expert,
    recommendations,
)
from moe_router.lifecycle.judged import add_judged_file, add_judged_queries, read_judged_file
from moe_router.lifecycle.load_report import LoadReport, LoadRow, load_chart, load_report
from moe_router.lifecycle.merge_split import merge_experts, split_expert
from moe_router.lifecycle.optimize import OptimizeAction, OptimizeReport, RoutingQuality, optimize_routing
from moe_router.routing.hierarchy import group_by_parent, hierarchy, route_two_level, search_two_level

__all__ = [
    "AutoCreateReport",
    "FeedbackStats",
    "LoadReport",
    "LoadRow",
    "OptimizeAction",
    "OptimizeReport",
    "Recommendation",
    "RecommendationRules",
    "RoutingQuality",
    "add_judged_file",
    "add_judged_queries",
    "auto_create_by_category",
    "auto_create_by_clustering",
    "auto_create_experts",
    "feedback_stats",
    "group_by_parent",
    "hierarchy",
    "load_chart",
    "load_report",
    "merge_experts",
    "nearest_expert",
    "optimize_routing",
    "read_judged_file",
    "recommendations",
    "route_two_level",
    "search_two_level",
    "split_expert",
]
