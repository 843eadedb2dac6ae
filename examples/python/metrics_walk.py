"""A short walk through MetricsService: record a batch of time-series points
(and replay it), then aggregate them per minute.

Each step is a function of the shared `Walk`; main.py runs STEPS in order."""

import datetime
import math

import grpc
from google.protobuf import duration_pb2

from verdict.v1 import common_pb2
from verdict.v1 import metrics_pb2 as pb
from verdict_client import DEADLINE_SECONDS, expect_error, field_violations

NAME = "example.validation.duration"
# (minute of the range, value): three points in the first minute, none in the
# second, one in the third.
POINTS = [(0, 10.0), (0, 20.0), (0, 30.0), (2, 100.0)]


def _range_start() -> datetime.datetime:
    """A whole minute an hour ago (buckets are aligned to the Unix epoch)."""
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    return now.replace(second=0, microsecond=0)


def record_points(walk):
    """RecordMetricPoints stores a batch atomically; a replay stores nothing.
    A non-finite value is INVALID_ARGUMENT on `points[i].value`."""
    walk.metrics_start = _range_start()
    points = []
    for i, (minute, value) in enumerate(POINTS):
        point = pb.MetricPoint(name=NAME, value=value, unit="ms", labels={"run": walk.run_id})
        at = walk.metrics_start + datetime.timedelta(minutes=minute, seconds=i)
        point.recorded_at.FromDatetime(at)
        points.append(point)
    request = pb.RecordMetricPointsRequest(batch_id=f"{walk.run_id}-points-1", points=points)
    m = walk.verdict.metrics
    first = m.RecordMetricPoints(request, timeout=DEADLINE_SECONDS)
    assert first.recorded == len(POINTS) and not first.replayed, first
    replay = m.RecordMetricPoints(request, timeout=DEADLINE_SECONDS)
    assert replay.replayed and replay.recorded == len(POINTS), replay

    bad = pb.MetricPoint(name=NAME, value=math.nan)
    bad.recorded_at.CopyFrom(points[0].recorded_at)
    error = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        m.RecordMetricPoints,
        pb.RecordMetricPointsRequest(batch_id=f"{walk.run_id}-points-bad", points=[points[0], bad]),
    )
    assert "points[1].value" in field_violations(error), field_violations(error)


def query_time_series(walk):
    """QueryTimeSeries per minute over three minutes: every bucket comes back,
    oldest first, an empty one with a count of 0 and no aggregates."""
    time_range = common_pb2.TimeRange()
    time_range.start_time.FromDatetime(walk.metrics_start)
    time_range.end_time.FromDatetime(walk.metrics_start + datetime.timedelta(minutes=3))
    series = walk.verdict.metrics.QueryTimeSeries(
        pb.QueryTimeSeriesRequest(
            name=NAME,
            label_filter={"run": walk.run_id},
            range=time_range,
            bucket_width=duration_pb2.Duration(seconds=60),
        ),
        timeout=DEADLINE_SECONDS,
    )
    buckets = list(series.buckets)
    starts = [b.start_time.ToDatetime(tzinfo=datetime.timezone.utc) for b in buckets]
    assert starts == [walk.metrics_start + datetime.timedelta(minutes=i) for i in range(3)], starts
    assert [b.count for b in buckets] == [3, 0, 1], [b.count for b in buckets]
    first, empty, last = buckets
    assert (first.sum, first.avg, first.min, first.max, first.p50) == (60, 20, 10, 30, 20), first
    assert not empty.HasField("avg"), "an empty bucket has no average"
    assert last.max == 100


STEPS = [
    record_points,
    query_time_series,
]
