"""DICOMweb transport of `slmfed fetch` (QIDO-RS queries, WADO-RS retrieval, dicomweb-client).

Why its own module: it is the only place that knows HTTP: basic or bearer-token auth from the
site's secret file, TLS verified against the site's CA bundle, and the translation of HTTP and
connection failures into one line naming the problem (client/fetch.py PacsError). Retries are off:
a refused password must not be tried five times against the hospital's account lockout.
"""
from __future__ import annotations

import logging

from client.fetch import InstanceInfo, PacsConfig, PacsError, SeriesInfo, StudyInfo

logging.getLogger("retrying").setLevel(logging.CRITICAL)  # retries are off; its warning is a traceback
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # an INFO line per request, with UIDs

STUDY_FIELDS = ["StudyInstanceUID", "StudyDate", "ModalitiesInStudy"]
SERIES_FIELDS = ["SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances"]
INSTANCE_FIELDS = ["SOPInstanceUID", "SOPClassUID", "ImageType", "ProtocolName", "SequenceName", "00189087",
                   "InstanceNumber"]


def _values(obj: dict, tag: str) -> list:
    return list((obj.get(tag) or {}).get("Value") or [])


def _first(obj: dict, tag: str, default=""):
    v = _values(obj, tag)
    return v[0] if v else default


def _int(v, default=0) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return default


def _session_class():
    import requests

    class Session(requests.Session):
        """A session whose own `verify` (the site's ca-bundle) wins: plain requests lets a
        REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment override it."""

        def request(self, *args, **kwargs):
            kwargs.setdefault("verify", self.verify)
            return super().request(*args, **kwargs)

    return Session


def _Session():
    return _session_class()()


class DicomWebTransport:
    """One DICOMweb PACS (see client/fetch.py for the interface every transport offers)."""

    def __init__(self, cfg: PacsConfig, secret: str = ""):
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.cfg = cfg
        session = _Session()
        if cfg.auth == "basic":
            session.auth = (cfg.username, secret)
        elif cfg.auth == "token":
            session.headers["Authorization"] = f"Bearer {secret}"
        session.verify = cfg.ca_bundle or True
        self.session = session
        self.client = DICOMwebClient(cfg.url.rstrip("/"), session=session, timeout=cfg.timeout_s)
        self.client.set_http_retry_params(retry=False)

    # -- errors ------------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        import requests

        label = self.cfg.label()
        try:
            return fn(*args, **kwargs)
        except requests.exceptions.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code in (401, 403):
                how = {"basic": "the username and the password in secret-file", "token": "the token in secret-file",
                       "none": "auth = 'none' (the PACS wants credentials)"}[self.cfg.auth]
                raise PacsError(f"{label} refused the credentials (HTTP {code} on {what}): check {how}", fatal=True) \
                    from None
            if code == 404 and what == "the study query":
                raise PacsError(f"{label} has no DICOMweb service at this url (HTTP 404): check 'url'", fatal=True) \
                    from None
            raise PacsError(f"{label} answered HTTP {code} on {what}") from None
        except requests.exceptions.SSLError as exc:
            raise PacsError(f"{label}: TLS verification failed ({_short(exc)}): check 'ca-bundle'", fatal=True) from None
        except requests.exceptions.ConnectionError as exc:
            raise PacsError(f"{label} is unreachable ({_short(exc)})", fatal=True) from None
        except requests.exceptions.Timeout:
            raise PacsError(f"{label} did not answer {what} within {self.cfg.timeout_s:g} s", fatal=True) from None
        except (ValueError, KeyError) as exc:  # a malformed answer
            raise PacsError(f"{label} sent a malformed answer to {what} ({type(exc).__name__})") from None

    # -- queries -----------------------------------------------------------------------------
    def find_studies(self, patient_id: str, accession: str) -> list[StudyInfo]:
        filters = {}
        if patient_id:
            filters["PatientID"] = patient_id
        if accession:
            filters["AccessionNumber"] = accession
        found = self._call("the study query", self.client.search_for_studies, search_filters=filters,
                           fields=STUDY_FIELDS, get_remaining=True)
        return [StudyInfo(_first(s, "0020000D"), _first(s, "00080020"), tuple(_values(s, "00080061")))
                for s in found or []]

    def find_series(self, study_uid: str) -> list[SeriesInfo]:
        found = self._call("the series query", self.client.search_for_series, study_instance_uid=study_uid,
                           fields=SERIES_FIELDS, get_remaining=True)
        out = []
        for s in found or []:
            count = _values(s, "00201209")
            out.append(SeriesInfo(_first(s, "0020000E"), _first(s, "00080060"), _first(s, "0008103E"),
                                  _int(_first(s, "00200011", 0)), _int(count[0]) if count else None))
        return out

    def find_instances(self, study_uid: str, series_uid: str, modality: str = "MR") -> list[InstanceInfo]:
        found = self._call("the instance query", self.client.search_for_instances, study_instance_uid=study_uid,
                           series_instance_uid=series_uid, fields=INSTANCE_FIELDS, get_remaining=True)
        out = []
        for i in found or []:
            b = _first(i, "00189087", None)
            out.append(InstanceInfo(_first(i, "00080018"), _first(i, "00080016"), tuple(_values(i, "00080008")),
                                    _first(i, "00181030"), _first(i, "00180024"),
                                    float(b) if b is not None else None, _int(_first(i, "00200013", 0))))
        return out

    # -- retrieval ---------------------------------------------------------------------------
    def retrieve(self, study_uid: str, series_uid: str, sop_uids: list[str], whole_series: bool, sink) -> None:
        """Each wanted instance to `sink` (a dataset at a time): the whole series in one streamed
        request when nothing of it is on disk yet, else instance by instance."""
        if whole_series:
            it = self._call("the series retrieval", self.client.iter_series, study_uid, series_uid)
            while True:
                ds = self._call("the series retrieval", next, it, None)
                if ds is None:
                    break
                sink(ds)
            return
        for sop in sop_uids:
            sink(self._call("an instance retrieval", self.client.retrieve_instance, study_uid, series_uid, sop))

    def close(self) -> None:
        self.session.close()


def _short(exc: Exception) -> str:
    """The innermost cause of a requests error, in a few words (no URL with credentials)."""
    text = str(exc)
    for key in ("Connection refused", "Name or service not known", "timed out", "certificate verify failed",
                "No route to host", "Temporary failure in name resolution"):
        if key in text:
            return key.lower() if key != "Connection refused" else "connection refused"
    return type(exc).__name__
