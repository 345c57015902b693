"""A multipart upload left incomplete by a killed writer is aborted under our root, and only there."""

from __future__ import annotations

import boto3

from latents.storage import Root


def test_incomplete_multipart_uploads_under_the_root_are_aborted(s3_bucket):
    bucket = s3_bucket.removeprefix("s3://")
    s3 = boto3.client("s3")  # the moto server, through the session's AWS_ENDPOINT_URL

    def begin(key: str) -> str:  # a writer SIGKILLed after its first part: never completed
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * (5 << 20))
        return upload

    ours = [begin("data/ds/samples.parquet"), begin("data/ds/shards/shard-000003.tar")]
    theirs = [begin("data/ds2/samples.parquet"), begin("other/samples.parquet")]  # ds2 shares the prefix "data/ds"

    assert Root(f"{s3_bucket}/data/ds").abort_uploads() == 2
    left = {u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert left == set(theirs) and not left & set(ours)
    assert Root(f"{s3_bucket}/data/ds").abort_uploads() == 0
    assert Root("memory://sit-uploads/ds").abort_uploads() == 0  # nothing to do elsewhere
