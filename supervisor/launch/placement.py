"""Keep a managed job's nodes near its checkpoint bucket.

SkyPilot's default recovery, EAGER_NEXT_REGION, terminates the cluster and
relaunches it in another region (sky/jobs/recovery_strategy.py,
EagerFailoverStrategyExecutor.recover), away from the bucket: every save and
load then pays egress and runs slower. FAILOVER (FailoverStrategyExecutor.recover)
first relaunches in the region of the cluster it had (so a 69 on a healthy
cluster comes back in place), and only then anywhere the task allows. So unless
the recipe chooses a strategy, the task gets FAILOVER; and unless it chooses a
strategy or a region, its `infra` is pinned to the bucket's region when that can
be read: S3's GetBucketLocation through s3fs/botocore, the GCS bucket resource's
`location` through gcsfs. An explicit region that differs from the bucket's is
kept, with a warning.

`place` is the pure decision; `read_location` is the one store call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import urlparse

# The strategy rendered when the recipe names none (a name in SkyPilot's
# JOBS_RECOVERY_STRATEGY_REGISTRY: sky/jobs/recovery_strategy.py registers
# FAILOVER and EAGER_NEXT_REGION, the latter as default=True).
NEAR_BUCKET_STRATEGY = "FAILOVER"
# Hosts of AWS's own S3 endpoints: a bucket behind any other endpoint (MinIO,
# SeaweedFS, ...) is in no AWS region, whatever its GetBucketLocation says.
AWS_S3_HOST_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn")
LOCATION_TIMEOUT_S = 15.0  # one store call at `start`; never the store's minute of retries
# S3's GetBucketLocation: an empty constraint is us-east-1, "EU" the old name of eu-west-1.
_S3_LEGACY_REGIONS = {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}


@dataclass(frozen=True)
class BucketLocation:
    """Where a bucket is, as SkyPilot's `infra` names it (`aws/us-east-1`), or why unknown."""

    cloud: str | None = None
    region: str | None = None
    why: str = ""  # when region is None

    @property
    def infra(self) -> str | None:
        return f"{self.cloud}/{self.region}" if self.cloud and self.region else None


@dataclass(frozen=True)
class Placement:
    """What the task gets: job_recovery's strategy, resources.infra, and what `start` says about it."""

    strategy: str | None
    infra: str | None
    lines: list[str] = field(default_factory=list)  # one line each, "warning: ..." or "note: ..."


def needs_location(strategy: str | None, infra_region: str | None) -> bool:
    """The bucket's location matters unless the recipe chose a strategy and no region."""
    return infra_region is not None or strategy is None


def place(bucket: str, strategy: str | None, infra: str | None, infra_cloud: str | None,
          infra_region: str | None, location: BucketLocation | None) -> Placement:
    """The recipe's choices (`strategy`, `infra` parsed into cloud and region) and the
    bucket's `location` (None when it was not needed) -> what the task gets."""
    rendered = strategy or NEAR_BUCKET_STRATEGY
    where = location.infra if location else None
    if infra_region is not None:
        same_cloud = infra_cloud in (None, location.cloud if location else None)
        if where and same_cloud and infra_region != location.region:
            return Placement(rendered, infra, [
                f"warning: resources.infra {infra} puts the nodes in another region than the bucket {bucket} "
                f"({where}): every save and load crosses regions (egress, slower); use --infra {where}"])
        return Placement(rendered, infra)
    if strategy is not None:
        return Placement(rendered, infra, [
            f"note: recovery.strategy {strategy} is set: the nodes are not pinned to the bucket's region"])
    if not where:
        why = location.why if location else "its location was not read"
        return Placement(rendered, infra, [f"note: not pinned to the bucket's region: {why}"])
    if infra_cloud is not None and infra_cloud != location.cloud:
        return Placement(rendered, infra, [
            f"note: not pinned to the bucket's region: resources.infra {infra} is not the bucket's cloud ({where})"])
    return Placement(rendered, where, [
        f"note: nodes pinned to {where}, the region of the bucket {bucket}; recovery {rendered} relaunches there "
        f"first (set resources.infra or recovery.strategy to choose otherwise)"])


def is_aws_endpoint(endpoint: str | None) -> bool:
    """No endpoint (botocore's own: AWS) or a host of AWS's S3."""
    if not endpoint:
        return True
    host = (urlparse(endpoint).hostname or "").lower()
    return host.endswith(AWS_S3_HOST_SUFFIXES)


def s3_region(constraint: str | None) -> str:
    """GetBucketLocation's LocationConstraint as a region name."""
    return _S3_LEGACY_REGIONS.get(constraint, constraint)


def gcs_region(resource: Mapping) -> str | None:
    """A GCS bucket resource's single region (`locationType: region`), else None."""
    if str(resource.get("locationType", "")).lower() != "region" or not resource.get("location"):
        return None
    return str(resource["location"]).lower()


def read_location(bucket_url: str, endpoint: str | None, *, timeout_s: float = LOCATION_TIMEOUT_S) -> BucketLocation:
    """The bucket's region, one store call bounded by `timeout_s`; never raises."""
    scheme, rest = bucket_url.split("://", 1)
    bucket = rest.partition("/")[0]
    if scheme == "s3" and not is_aws_endpoint(endpoint):
        host = urlparse(endpoint).hostname
        return BucketLocation(why=f"the bucket is on an S3-compatible store at {host}, in no AWS region")
    if scheme not in ("s3", "gs"):
        return BucketLocation(why=f"{scheme}:// buckets are in no region SkyPilot launches nodes in")
    result: list[BucketLocation] = []

    def read() -> None:
        try:
            result.append(_s3_location(bucket, endpoint) if scheme == "s3" else _gcs_location(bucket))
        except Exception as err:  # noqa: BLE001 - any failure only means "not pinned"
            text = str(err).strip().splitlines()
            result.append(BucketLocation(why=f"its location could not be read ({type(err).__name__}: "
                                             f"{text[0] if text else ''})"))

    worker = threading.Thread(target=read, name="supervise-bucket-location", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return result[0] if result else BucketLocation(why=f"its location could not be read within {timeout_s:.0f} s")


def _s3_location(bucket: str, endpoint: str | None) -> BucketLocation:
    """GetBucketLocation through s3fs (botocore's credential chain), one attempt."""
    import s3fs

    fs = s3fs.S3FileSystem(
        skip_instance_cache=True, endpoint_url=endpoint,
        config_kwargs={"connect_timeout": 5, "read_timeout": 10, "retries": {"max_attempts": 1}},
    )  # fmt: skip
    fs.retries = 1
    answer = fs.call_s3("get_bucket_location", Bucket=bucket)
    return BucketLocation("aws", s3_region(answer.get("LocationConstraint")))


def _gcs_location(bucket: str) -> BucketLocation:
    """The bucket resource (GET b/<bucket>) through gcsfs: its location and locationType."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(skip_instance_cache=True, requests_timeout=10)
    resource = fs.call("GET", "b/{}", bucket, json_out=True)
    region = gcs_region(resource)
    if region is None:
        return BucketLocation(why=f"the bucket is {resource.get('locationType', '?')} {resource.get('location', '?')}, "
                                  f"not one region")
    return BucketLocation("gcp", region)
