"""The S3 endpoint fixture speaks the real protocol: a put is readable back."""

import boto3


def test_put_and_get_round_trip(s3_bucket: str) -> None:
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"hello")
    assert client.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read() == b"hello"
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="a/")["Contents"]
    assert [o["Key"] for o in listed] == ["a/b.txt"]
