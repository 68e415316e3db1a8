#!/usr/bin/env python3
"""moto's server, patched to behave like AWS where Sluice's discovery tests need it.

Started by `sluice_tests::moto::Moto` on loopback; prints `READY <port>` on stdout once it listens.

moto 5.2 differs from AWS in ways that matter to RDS Proxy discovery; this wrapper fixes them:

* DescribeDBProxyEndpoints / CreateDBProxyEndpoint / DeleteDBProxyEndpoint are not implemented
  (HTTP 500): implemented here, including the proxy's default endpoint (IsDefault=true).
* Proxy hosts are `NAME.db-proxy-ID.REGION...`; AWS uses `NAME.proxy-ID.REGION.rds.amazonaws.com`
  and `NAME.endpoint.proxy-ID.REGION.rds.amazonaws.com` for custom endpoints.
* DescribeDBProxies ignores MaxRecords/Marker: paged here (SLUICE_MOTO_PAGE_SIZE forces small pages
  so that a handful of proxies exercises paging).
* AssumeRole accepts any ExternalId: here a role whose trust policy has a StringEquals
  `sts:ExternalId` condition refuses a missing or different one with AccessDenied, as AWS does.

Test-only endpoints under /_sluice/ (JSON in, JSON out):

* POST /_sluice/proxy {account?, region, name, engine?, require_tls?, tags?, status?}: creates the
  VPC and subnet moto needs, then the proxy; returns {arn, endpoint, vpc_id, resource_id}.
* POST /_sluice/proxy-endpoint {account?, region, proxy, name, target_role?}
* POST /_sluice/delete-proxy {account?, region, name}
* POST /_sluice/role {account?, name, external_id?}: a role any principal may assume.
* POST /_sluice/faults {count, status, code}: the next `count` RDS calls (-1: all until cleared with
  count 0) fail with this HTTP status and AWS error code.
* GET /_sluice/credentials?access_key_id=AKID: the secret and session token moto minted for an
  access key (so the RDS Proxy emulator can verify tokens signed with assumed-role credentials).
* GET /_sluice/role-policy?account=&role=&name= : an inline role policy as stored.
"""

import json
import os
import sys
import threading
import urllib.parse

from moto.rds.exceptions import RDSClientError
from moto.sts.exceptions import STSClientError
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from moto.rds import models as rds_models
from moto.rds.responses import RDSResponse
from moto.sts.responses import TokenResponse as STSResponse
from werkzeug.serving import make_server

DEFAULT_ACCOUNT = "123456789012"
PAGE_SIZE = int(os.environ.get("SLUICE_MOTO_PAGE_SIZE", "100"))

# --- AWS-style proxy hosts -------------------------------------------------------------------

_orig_proxy_init = rds_models.DBProxy.__init__


def _proxy_init(self, *args, **kwargs):
    _orig_proxy_init(self, *args, **kwargs)
    self.endpoint = f"{self.db_proxy_name}.proxy-{self.url_identifier}.{self.region}.rds.amazonaws.com"
    self.sluice_endpoints = {}


rds_models.DBProxy.__init__ = _proxy_init


def _rds_backend(account, region):
    return rds_models.rds_backends[account or DEFAULT_ACCOUNT][region]


def _endpoint_dict(proxy, name, ep):
    return {
        "DBProxyEndpointName": name,
        "DBProxyEndpointArn": ep["arn"],
        "DBProxyName": proxy.db_proxy_name,
        "Status": "available",
        "VpcId": proxy.vpc_id,
        "VpcSubnetIds": proxy.vpc_subnet_ids,
        "VpcSecurityGroupIds": proxy.vpc_security_group_ids,
        "Endpoint": ep["host"],
        "TargetRole": ep["target_role"],
        "IsDefault": ep["default"],
    }


def _endpoints_of(proxy):
    eps = {"default": {"arn": proxy.arn, "host": proxy.endpoint, "target_role": "READ_WRITE", "default": True}}
    eps.update(proxy.sluice_endpoints)
    return [_endpoint_dict(proxy, n, e) for n, e in eps.items()]


def _page(items, params):
    max_records = int(params.get("MaxRecords") or 100)
    size = max(1, min(max_records, PAGE_SIZE))
    start = int(params.get("Marker") or 0)
    page = items[start : start + size]
    marker = str(start + size) if start + size < len(items) else None
    return page, marker


def _describe_db_proxies(self):
    params = self.params
    proxies = self.backend.describe_db_proxies(db_proxy_name=params.get("DBProxyName"))
    page, marker = _page(list(proxies), params)
    result = {"DBProxies": page}
    if marker:
        result["Marker"] = marker
    return _action_result(result)


def _action_result(result):
    from moto.core.responses import ActionResult

    return ActionResult(result)


def _describe_db_proxy_endpoints(self):
    params = self.params
    name = params.get("DBProxyName")
    proxies = self.backend.describe_db_proxies(db_proxy_name=name)
    eps = [e for p in proxies for e in _endpoints_of(p)]
    if params.get("DBProxyEndpointName"):
        eps = [e for e in eps if e["DBProxyEndpointName"] == params["DBProxyEndpointName"]]
    page, marker = _page(eps, params)
    result = {"DBProxyEndpoints": page}
    if marker:
        result["Marker"] = marker
    return _action_result(result)


def _add_endpoint(proxy, name, target_role):
    host = f"{name}.endpoint.proxy-{proxy.url_identifier}.{proxy.region}.rds.amazonaws.com"
    arn = f"arn:aws:rds:{proxy.region}:{proxy.account_id}:db-proxy-endpoint:prx-endpoint-{name}"
    proxy.sluice_endpoints[name] = {"arn": arn, "host": host, "target_role": target_role, "default": False}
    return _endpoint_dict(proxy, name, proxy.sluice_endpoints[name])


def _create_db_proxy_endpoint(self):
    params = self.params
    proxy = self.backend.describe_db_proxies(db_proxy_name=params["DBProxyName"])[0]
    ep = _add_endpoint(proxy, params["DBProxyEndpointName"], params.get("TargetRole") or "READ_WRITE")
    return _action_result({"DBProxyEndpoint": ep})


def _delete_db_proxy_endpoint(self):
    name = self.params["DBProxyEndpointName"]
    for proxy in self.backend.db_proxies.values():
        if name in proxy.sluice_endpoints:
            ep = _endpoint_dict(proxy, name, proxy.sluice_endpoints.pop(name))
            return _action_result({"DBProxyEndpoint": ep})
    raise RDSClientError("DBProxyEndpointNotFoundFault", f"DBProxyEndpoint {name} not found.")


RDSResponse.describe_db_proxies = _describe_db_proxies
RDSResponse.describe_db_proxy_endpoints = _describe_db_proxy_endpoints
RDSResponse.create_db_proxy_endpoint = _create_db_proxy_endpoint
RDSResponse.delete_db_proxy_endpoint = _delete_db_proxy_endpoint

# --- ExternalId on AssumeRole ----------------------------------------------------------------

_orig_assume_role = STSResponse.assume_role


def _required_external_id(role_arn):
    from moto.iam.models import iam_backends

    parts = role_arn.split(":")
    if len(parts) < 6:
        return None
    try:
        role = iam_backends[parts[4]]["global"].get_role_by_arn(role_arn)
    except Exception:
        return None
    doc = role.assume_role_policy_document
    doc = json.loads(urllib.parse.unquote(doc)) if isinstance(doc, str) else doc
    for stmt in doc.get("Statement", []):
        cond = stmt.get("Condition", {}).get("StringEquals", {})
        if "sts:ExternalId" in cond:
            return cond["sts:ExternalId"]
    return None


def _assume_role(self):
    role_arn = self._get_param("RoleArn")
    want = _required_external_id(role_arn)
    got = self._get_param("ExternalId")
    if want is not None and got != want:
        raise STSClientError(
            "AccessDenied",
            f"User: {self.get_current_account()} is not authorized to perform: sts:AssumeRole on resource: {role_arn}",
        )
    return _orig_assume_role(self)


STSResponse.assume_role = _assume_role

# --- test-only endpoints and fault injection -------------------------------------------------

_faults = {"count": 0, "status": 400, "code": "Throttling"}
_lock = threading.Lock()


def _json(start_response, status, body):
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def _create_proxy(req):
    from moto.ec2.models import ec2_backends

    account, region = req.get("account") or DEFAULT_ACCOUNT, req["region"]
    ec2 = ec2_backends[account][region]
    vpc = ec2.create_vpc(cidr_block="10.0.0.0/16")
    subnet = ec2.create_subnet(vpc_id=vpc.id, cidr_block="10.0.1.0/24", availability_zone=f"{region}a")
    tags = [{"Key": k, "Value": v} for k, v in (req.get("tags") or {}).items()]
    proxy = _rds_backend(account, region).create_db_proxy(
        db_proxy_name=req["name"],
        engine_family=req.get("engine") or "POSTGRESQL",
        auth=[{"AuthScheme": "SECRETS", "IAMAuth": "REQUIRED", "SecretArn": "arn:aws:secretsmanager:x"}],
        role_arn=f"arn:aws:iam::{account}:role/rds-proxy",
        vpc_subnet_ids=[subnet.id],
        vpc_security_group_ids=None,
        require_tls=req.get("require_tls", True),
        idle_client_timeout=None,
        debug_logging=None,
        tags=tags,
    )
    if req.get("status"):
        proxy.status = req["status"]
    return {"arn": proxy.arn, "endpoint": proxy.endpoint, "vpc_id": proxy.vpc_id, "resource_id": proxy.unique_id}


def _admin(method, path, query, req):
    if path == "/_sluice/proxy":
        return _create_proxy(req)
    if path == "/_sluice/proxy-endpoint":
        backend = _rds_backend(req.get("account"), req["region"])
        proxy = backend.db_proxies[req["proxy"]]
        return _add_endpoint(proxy, req["name"], req.get("target_role") or "READ_WRITE")
    if path == "/_sluice/delete-proxy":
        _rds_backend(req.get("account"), req["region"]).delete_db_proxy(req["name"])
        return {}
    if path == "/_sluice/role":
        from moto.iam.models import iam_backends

        account = req.get("account") or DEFAULT_ACCOUNT
        stmt = {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}
        if req.get("external_id"):
            stmt["Condition"] = {"StringEquals": {"sts:ExternalId": req["external_id"]}}
        role = iam_backends[account]["global"].create_role(
            role_name=req["name"],
            assume_role_policy_document=json.dumps({"Version": "2012-10-17", "Statement": [stmt]}),
            path="/",
            permissions_boundary=None,
            description="",
            tags=[],
            max_session_duration=None,
        )
        return {"arn": role.arn}
    if path == "/_sluice/faults":
        with _lock:
            _faults.update({"count": int(req["count"]), "status": int(req.get("status", 400))})
            _faults["code"] = req.get("code", "Throttling")
        return {}
    if path == "/_sluice/credentials":
        from moto.sts.models import sts_backends

        akid = query.get("access_key_id", [""])[0]
        for by_partition in sts_backends.values():
            for backend in by_partition.values():
                role = backend.get_assumed_role_from_access_key(akid)
                if role is not None:
                    return {"secret_access_key": role.secret_access_key, "session_token": role.session_token}
        return None
    if path == "/_sluice/role-policy":
        from moto.iam.models import iam_backends

        account = query.get("account", [DEFAULT_ACCOUNT])[0]
        backend = iam_backends[account]["global"]
        role = backend.get_role(query["role"][0])
        doc = role.policies.get(query["name"][0])
        return None if doc is None else {"document": urllib.parse.unquote(doc) if "%" in doc else doc}
    return None


def _is_rds(environ):
    auth = environ.get("HTTP_AUTHORIZATION", "")
    return "/rds/aws4_request" in auth


def wrap(app):
    def middleware(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_sluice/"):
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            body = {}
            if environ.get("REQUEST_METHOD") == "POST":
                length = int(environ.get("CONTENT_LENGTH") or 0)
                raw = environ["wsgi.input"].read(length) if length else b""
                body = json.loads(raw or b"{}")
            try:
                out = _admin(environ.get("REQUEST_METHOD"), path, query, body)
            except Exception as e:  # the test sees the reason
                return _json(start_response, "500 Internal Server Error", {"error": repr(e)})
            if out is None:
                return _json(start_response, "404 Not Found", {"error": "not found"})
            return _json(start_response, "200 OK", out)
        if _is_rds(environ):
            with _lock:
                fail = _faults["count"] != 0
                if _faults["count"] > 0:
                    _faults["count"] -= 1
                status, code = _faults["status"], _faults["code"]
            if fail:
                body = (
                    "<ErrorResponse><Error><Type>Sender</Type>"
                    f"<Code>{code}</Code><Message>injected by the test: {code}</Message>"
                    "</Error><RequestId>sluice-fault</RequestId></ErrorResponse>"
                ).encode()
                reason = {400: "Bad Request", 403: "Forbidden", 500: "Internal Server Error", 503: "Unavailable"}
                start_response(
                    f"{status} {reason.get(status, 'Error')}",
                    [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))],
                )
                return [body]
        return app(environ, start_response)

    return middleware


def main():
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    server = make_server(host, 0, wrap(DomainDispatcherApplication(create_backend_app)), threaded=True)
    print(f"READY {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
