"""Pure-logic tests of the SynchronizationCredentials parser (emlisten.api.credentials)."""

from __future__ import annotations

from typing import Any

import pytest

from emlisten.api.credentials import (
    AUTODISCOVER_NEEDS_ADDRESS,
    SecureOption,
    parse_credentials,
    parse_credentials_array,
    parse_mailbox_id_spellings,
    parse_mailbox_ids,
    resolve_imap_security,
    resolve_smtp_security,
)
from emlisten.errors import ValidationError
from emlisten.models import INBOX, Security

MAILBOX_ID = "0F8FAD5B-D9CB-469F-A165-70867728950E"
MAILBOX_ID_LOWER = MAILBOX_ID.lower()
PASSWORD = "pa55-SECRET-value"
TOKEN = "ya29.SECRET-oauth-token"


def creds(**overrides: Any) -> dict[str, Any]:
    """A valid Creatio-like element; ``None`` in overrides removes the field."""
    data: dict[str, Any] = {
        "Id": MAILBOX_ID,
        "UserName": "alice@example.com",
        "Password": PASSWORD,
        "SenderEmailAddress": "alice@example.com",
        "ServiceUrl": "imap.example.com",
        "Port": 993,
        "UseSsl": True,
        "ServerTypeId": "b2a9e3a4-1111-2222-3333-444455556666",
        "BpmUser": "Supervisor",
        "BpmUserWorkspace": "Default",
        "BpmUserTimeZone": "UTC",
        "BpmEndpoint": "https://crm.example.com/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
        "FolderIds": [],
        "UseFullEmail": True,
        "IsAutodiscover": False,
        "SubscriptionTtl": 0,
        "PersonalMetrics": {"x": 1},
        "FeatureValues": {"MarkEmailsAsSynchronized": True},
        "Context": {"UserRequested": False, "HasError": False},
    }
    for key, value in overrides.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def error_of(data: Any, **kwargs: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse_credentials(data, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------------
# The happy path and field mapping


def test_full_element_maps_to_mailbox_config() -> None:
    mailbox = parse_credentials(creds())
    assert mailbox.id == MAILBOX_ID_LOWER
    assert mailbox.user_name == "alice@example.com"
    assert mailbox.password == PASSWORD
    assert mailbox.access_token == ""
    assert not mailbox.use_oauth
    assert mailbox.sender_email == "alice@example.com"
    assert mailbox.imap.host == "imap.example.com"
    assert mailbox.imap.port == 993
    assert mailbox.imap.security is Security.SSL_ON_CONNECT
    assert mailbox.imap.verify_certificate is True
    assert mailbox.bpm_endpoint.endswith("/ProcessFullEmail")
    assert mailbox.bpm_user == "Supervisor"
    assert mailbox.bpm_user_workspace == "Default"
    assert mailbox.bpm_user_time_zone == "UTC"
    assert mailbox.folders == (INBOX,)
    assert mailbox.use_full_email is True
    assert mailbox.smtp is None
    assert mailbox.feature_values == {"MarkEmailsAsSynchronized": True}
    assert mailbox.context == {"UserRequested": False, "HasError": False}


def test_field_names_are_case_insensitive() -> None:
    data = {key.lower(): value for key, value in creds().items()}
    data["SERVICEURL"] = data.pop("serviceurl")
    data["bPmEnDpOiNt"] = data.pop("bpmendpoint")
    mailbox = parse_credentials(data)
    assert mailbox.id == MAILBOX_ID_LOWER
    assert mailbox.imap.host == "imap.example.com"
    assert mailbox.bpm_endpoint.startswith("https://crm.example.com/")
    assert mailbox.password == PASSWORD


@pytest.mark.parametrize(
    "raw",
    [
        MAILBOX_ID,
        MAILBOX_ID_LOWER,
        "{" + MAILBOX_ID + "}",
        MAILBOX_ID.replace("-", ""),
        f"  {MAILBOX_ID}  ",
    ],
)
def test_id_is_normalised_to_lowercase_canonical_guid(raw: str) -> None:
    assert parse_credentials(creds(Id=raw)).id == MAILBOX_ID_LOWER


def test_folders_listed_are_kept_in_order_without_blanks_or_repeats() -> None:
    mailbox = parse_credentials(creds(FolderIds=["INBOX", "Support", "", "Support", "Sales/EU"]))
    assert mailbox.folders == ("INBOX", "Support", "Sales/EU")


def test_absent_or_null_folders_mean_inbox() -> None:
    assert parse_credentials(creds(FolderIds=None)).folders == (INBOX,)
    data = creds()
    data["FolderIds"] = None
    assert parse_credentials(data).folders == (INBOX,)


def test_use_full_email_defaults_to_true_and_can_be_false() -> None:
    assert parse_credentials(creds(UseFullEmail=None)).use_full_email is True
    assert parse_credentials(creds(UseFullEmail=False)).use_full_email is False


def test_feature_values_as_key_value_list_become_a_mapping() -> None:
    mailbox = parse_credentials(
        creds(FeatureValues=[{"Key": "UseBinaryData", "Value": True}, {"key": "X", "value": 1}])
    )
    assert mailbox.feature_values == {"UseBinaryData": True, "X": 1}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("FALSE", False),
        (1, True),
        (0, False),
        ("1", True),
        ("0", False),
    ],
)
def test_booleans_accept_json_bool_strings_and_0_1(raw: Any, expected: bool) -> None:
    assert parse_credentials(creds(UseFullEmail=raw)).use_full_email is expected


@pytest.mark.parametrize("raw", ["yes", 2, [], {}, 1.5])
def test_bad_boolean_names_the_field(raw: Any) -> None:
    assert error_of(creds(UseSsl=raw)).field == "UseSsl"


def test_server_type_id_is_kept_in_extra_and_not_interpreted() -> None:
    mailbox = parse_credentials(creds(ServerTypeId="not-even-a-guid"))
    assert mailbox.extra["ServerTypeId"] == "not-even-a-guid"
    assert mailbox.extra["IsAutodiscover"] is False
    assert mailbox.extra["PersonalMetrics"] == {"x": 1}
    assert "ServiceUrl" not in mailbox.extra  # modelled fields are not duplicated


def test_secrets_never_reach_extra_or_repr() -> None:
    mailbox = parse_credentials(
        creds(UseOAuth=True, AccessToken=TOKEN, RefreshToken="SECRET-refresh", SmtpPassword="x")
    )
    assert mailbox.password == PASSWORD
    assert mailbox.access_token == TOKEN
    lowered_keys = {key.lower() for key in mailbox.extra}
    assert not lowered_keys & {"password", "accesstoken", "refreshtoken", "smtppassword"}
    assert "SECRET" not in repr(mailbox.extra)
    assert PASSWORD not in repr(mailbox)
    assert TOKEN not in repr(mailbox)
    assert "SECRET" not in repr(mailbox)


# ------------------------------------------------------------------------------------------
# Required fields and bad values: each names its field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("Id", None),
        ("Id", ""),
        ("Id", "not-a-guid"),
        ("Id", 12),
        ("UserName", None),
        ("UserName", "  "),
        ("UserName", 5),
        ("Password", None),
        ("Password", ""),
        ("Password", 1234),
        ("ServiceUrl", None),
        ("ServiceUrl", ""),
        ("ServiceUrl", "bad host!"),
        ("ServiceUrl", "imap.example.com:99999"),
        ("ServiceUrl", "imap.example.com:abc"),
        ("ServiceUrl", "pop3://imap.example.com"),
        ("ServiceUrl", "imap://user:pw@imap.example.com"),
        ("ServiceUrl", "user@imap.example.com"),
        ("Port", 0.5),
        ("Port", 70000),
        ("Port", -1),
        ("Port", "abc"),
        ("Port", True),
        ("UseSsl", "maybe"),
        ("SecureOption", 7),
        ("SecureOption", "Sometimes"),
        ("SecureOption", True),
        ("BpmEndpoint", None),
        ("BpmEndpoint", "crm.example.com/0/ServiceModel"),
        ("BpmEndpoint", "ftp://crm.example.com/x"),
        ("BpmEndpoint", "/relative/path"),
        ("BpmEndpoint", 42),
        ("FolderIds", "INBOX"),
        ("FolderIds", {"a": 1}),
        ("FeatureValues", "x"),
        ("Context", [1]),
        ("SenderEmailAddress", 3),
        ("VerifyCertificate", "sure"),
        ("SmtpPort", 0.25),
        ("SmtpSecureOption", "bogus"),
    ],
)
def test_each_bad_field_is_named(field: str, value: Any) -> None:
    data = creds(**{field: value}) if value is not None else creds(**{field: None})
    error = error_of(data)
    assert error.field == field
    assert error.message


def test_bad_folder_element_is_named_with_its_position() -> None:
    assert error_of(creds(FolderIds=["INBOX", 3])).field == "FolderIds[1]"


def test_index_prefixes_the_field() -> None:
    assert error_of(creds(ServiceUrl=None), index=2).field == "[2].ServiceUrl"


def test_element_must_be_an_object() -> None:
    assert error_of("nope").field == "body"
    assert error_of([1], index=4).field == "[4]"


def test_oauth_requires_access_token_instead_of_password() -> None:
    mailbox = parse_credentials(creds(UseOAuth=True, Password=None, AccessToken=TOKEN))
    assert mailbox.use_oauth
    assert mailbox.access_token == TOKEN
    assert mailbox.password == ""
    assert error_of(creds(UseOAuth=True, Password=None)).field == "AccessToken"
    assert error_of(creds(UseOAuth="true", AccessToken="")).field == "AccessToken"


def test_error_messages_never_contain_secrets() -> None:
    secret_bearing = [
        creds(Password=["not", "a", "string"]),
        creds(ServiceUrl=f"imap://alice:{PASSWORD}@imap.example.com"),
        creds(BpmEndpoint=f"mailto:{PASSWORD}"),
        creds(UseOAuth=True, AccessToken={"t": TOKEN}),
        creds(Port=PASSWORD),
        creds(UseSsl=PASSWORD),
        creds(SecureOption=PASSWORD),
    ]
    for data in secret_bearing:
        error = error_of(data)
        for text in (str(error), repr(error), error.message, error.field):
            assert PASSWORD not in text
            assert TOKEN not in text


# ------------------------------------------------------------------------------------------
# ServiceUrl forms and protocol selection


@pytest.mark.parametrize(
    ("service_url", "host", "port"),
    [
        ("imap.example.com", "imap.example.com", 993),
        ("IMAP.Example.COM", "imap.example.com", 993),
        ("imap.example.com:1993", "imap.example.com", 1993),
        ("imap://imap.example.com:1143", "imap.example.com", 1143),
        ("imaps://imap.example.com", "imap.example.com", 993),
        ("imaps://imap.example.com/", "imap.example.com", 993),
        ("192.0.2.10", "192.0.2.10", 993),
        ("192.0.2.10:2993", "192.0.2.10", 2993),
        ("[::1]:1993", "::1", 1993),
        ("::1", "::1", 993),
        ("localhost", "localhost", 993),
    ],
)
def test_imap_service_url_forms(service_url: str, host: str, port: int) -> None:
    mailbox = parse_credentials(creds(ServiceUrl=service_url, Port=None))
    assert (mailbox.imap.host, mailbox.imap.port) == (host, port)


def test_port_field_wins_over_port_in_service_url() -> None:
    mailbox = parse_credentials(creds(ServiceUrl="imap.example.com:1993", Port=2993))
    assert mailbox.imap.port == 2993


@pytest.mark.parametrize("port", [None, 0, "", "0"])
def test_unset_port_values_use_the_default(port: Any) -> None:
    data = creds(Port=None)
    data["Port"] = port
    assert parse_credentials(data).imap.port == 993


def test_port_as_numeric_string_is_accepted() -> None:
    assert parse_credentials(creds(Port="1993")).imap.port == 1993


@pytest.mark.parametrize(
    ("fields", "protocol", "service_url", "host", "port", "security"),
    [
        (
            {"ServiceUrl": "https://outlook.office365.com/EWS/Exchange.asmx"},
            "ews",
            "https://outlook.office365.com/EWS/Exchange.asmx",
            "outlook.office365.com",
            443,
            Security.SSL_ON_CONNECT,
        ),
        (
            {"ServiceUrl": "http://exchange.local/ews/exchange.asmx"},
            "ews",
            "http://exchange.local/ews/exchange.asmx",
            "exchange.local",
            80,
            Security.NONE,
        ),
        (
            {"ServiceUrl": "HTTPS://mail.example.com"},
            "ews",
            "https://mail.example.com/EWS/Exchange.asmx",
            "mail.example.com",
            443,
            Security.SSL_ON_CONNECT,
        ),
        (
            {"ServiceUrl": "outlook.office365.com/EWS/Exchange.asmx"},
            "ews",
            "https://outlook.office365.com/EWS/Exchange.asmx",
            "outlook.office365.com",
            443,
            Security.SSL_ON_CONNECT,
        ),
        (
            {"ServiceUrl": "https://mail.example.com:8443/EWS/Exchange.asmx", "Port": 993},
            "ews",
            "https://mail.example.com:8443/EWS/Exchange.asmx",
            "mail.example.com",
            8443,
            Security.SSL_ON_CONNECT,
        ),
        (
            {"ServiceUrl": "mail.example.com", "Protocol": "EWS"},
            "ews",
            "https://mail.example.com/EWS/Exchange.asmx",
            "mail.example.com",
            443,
            Security.SSL_ON_CONNECT,
        ),
        (
            {"ServiceUrl": "https://graph.microsoft.com/v1.0/"},
            "graph",
            "https://graph.microsoft.com",
            "graph.microsoft.com",
            443,
            Security.SSL_ON_CONNECT,
        ),
        (
            {"ServiceUrl": "https://microsoftgraph.chinacloudapi.cn/v1.0"},
            "graph",
            "https://microsoftgraph.chinacloudapi.cn",
            "microsoftgraph.chinacloudapi.cn",
            443,
            Security.SSL_ON_CONNECT,
        ),
        (
            {"ServiceUrl": "https://graph.microsoft.us"},
            "graph",
            "https://graph.microsoft.us",
            "graph.microsoft.us",
            443,
            Security.SSL_ON_CONNECT,
        ),
        (
            {"ServiceUrl": "http://127.0.0.1:8123/whatever", "Protocol": "graph"},
            "graph",
            "http://127.0.0.1:8123",
            "127.0.0.1",
            8123,
            Security.NONE,
        ),
        (
            {"ServiceUrl": None, "Protocol": "Graph"},
            "graph",
            "https://graph.microsoft.com",
            "graph.microsoft.com",
            443,
            Security.SSL_ON_CONNECT,
        ),
        (
            {"ServiceUrl": "imap.example.com", "Protocol": "imap"},
            "imap",
            "",
            "imap.example.com",
            993,
            Security.SSL_ON_CONNECT,
        ),
    ],
)
def test_protocol_is_chosen_from_the_credentials(
    fields: dict[str, Any], protocol: str, service_url: str, host: str, port: int, security: Security
) -> None:
    mailbox = parse_credentials(creds(**fields))
    assert (mailbox.protocol, mailbox.service_url) == (protocol, service_url)
    assert (mailbox.imap.host, mailbox.imap.port, mailbox.imap.security) == (host, port, security)
    assert "Protocol" not in mailbox.extra


def test_host_name_is_imap_by_default() -> None:
    mailbox = parse_credentials(creds())
    assert (mailbox.protocol, mailbox.service_url) == ("imap", "")


def test_impersonated_user_is_kept_for_the_ews_adapter() -> None:
    mailbox = parse_credentials(
        creds(ServiceUrl="https://mail.example.com/EWS/Exchange.asmx", ImpersonatedUser="bob@example.com")
    )
    assert mailbox.extra["ImpersonatedUser"] == "bob@example.com"


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"Protocol": "pop3"}, "Protocol", 'must be one of "imap", "ews", "graph"'),
        (
            {"ServiceUrl": "https://outlook.office365.com/EWS/Exchange.asmx", "Protocol": "imap"},
            "ServiceUrl",
            "must be a host, host:port or mail server URL, not an http(s) URL or a path",
        ),
        (
            {"ServiceUrl": "imap://mail.example.com/EWS/Exchange.asmx"},
            "ServiceUrl",
            "must be a host, host:port or mail server URL, not an http(s) URL or a path",
        ),
        (
            {"ServiceUrl": "https://user:pw@mail.example.com/EWS"},
            "ServiceUrl",
            "must not contain credentials",
        ),
        (
            {"ServiceUrl": "ftp://mail.example.com", "Protocol": "ews"},
            "ServiceUrl",
            "must be an http(s) URL for Exchange (EWS or Graph)",
        ),
        ({"ServiceUrl": "https://bad host/EWS"}, "ServiceUrl", "must be a host name or IP address"),
        ({"ServiceUrl": None, "Protocol": "ews"}, "ServiceUrl", "required"),
        (
            {"ServiceUrl": "", "IsAutodiscover": True, "SenderEmailAddress": "", "UserName": "alice"},
            "ServiceUrl",
            AUTODISCOVER_NEEDS_ADDRESS,
        ),
    ],
)
def test_bad_protocol_or_exchange_urls_are_rejected(fields: dict[str, Any], field: str, message: str) -> None:
    error = error_of(creds(**fields), index=0)
    assert error.field == f"[0].{field}"
    assert error.message == message


# ------------------------------------------------------------------------------------------
# Security resolution


@pytest.mark.parametrize(
    ("secure_option", "use_ssl", "port", "tls_scheme", "expected"),
    [
        # SecureOption, MailKit's values.
        (SecureOption.NONE, None, 143, False, (Security.NONE, 143)),
        (SecureOption.NONE, None, None, False, (Security.NONE, 143)),
        (SecureOption.AUTO, None, 993, False, (Security.SSL_ON_CONNECT, 993)),
        (SecureOption.AUTO, None, None, False, (Security.SSL_ON_CONNECT, 993)),
        (SecureOption.AUTO, None, 143, False, (Security.STARTTLS_WHEN_AVAILABLE, 143)),
        (SecureOption.AUTO, None, 1143, False, (Security.STARTTLS_WHEN_AVAILABLE, 1143)),
        (SecureOption.SSL_ON_CONNECT, None, None, False, (Security.SSL_ON_CONNECT, 993)),
        (SecureOption.SSL_ON_CONNECT, False, 1993, False, (Security.SSL_ON_CONNECT, 1993)),
        (SecureOption.STARTTLS, None, None, False, (Security.STARTTLS, 143)),
        (SecureOption.STARTTLS, True, 993, False, (Security.STARTTLS, 993)),
        (SecureOption.STARTTLS_WHEN_AVAILABLE, None, 143, False, (Security.STARTTLS_WHEN_AVAILABLE, 143)),
        # SecureOption wins over UseSsl, except that 0 (also .NET's default) loses to UseSsl true.
        (SecureOption.NONE, True, 993, False, (Security.SSL_ON_CONNECT, 993)),
        (SecureOption.NONE, False, 993, False, (Security.NONE, 993)),
        # UseSsl without SecureOption.
        (None, True, 993, False, (Security.SSL_ON_CONNECT, 993)),
        (None, True, None, False, (Security.SSL_ON_CONNECT, 993)),
        (None, True, 143, False, (Security.STARTTLS, 143)),
        (None, True, 1993, False, (Security.SSL_ON_CONNECT, 1993)),
        (None, False, 143, False, (Security.NONE, 143)),
        (None, False, None, False, (Security.NONE, 143)),
        (None, False, 993, False, (Security.NONE, 993)),
        # imaps:// is an explicit TLS request; nothing at all means TLS.
        (None, False, None, True, (Security.SSL_ON_CONNECT, 993)),
        (SecureOption.NONE, None, None, True, (Security.SSL_ON_CONNECT, 993)),
        (None, None, None, True, (Security.SSL_ON_CONNECT, 993)),
        (None, None, None, False, (Security.SSL_ON_CONNECT, 993)),
        (None, None, 143, False, (Security.STARTTLS, 143)),
    ],
)
def test_imap_security_resolution_table(
    secure_option: SecureOption | None,
    use_ssl: bool | None,
    port: int | None,
    tls_scheme: bool,
    expected: tuple[Security, int],
) -> None:
    assert resolve_imap_security(secure_option, use_ssl, port, tls_scheme=tls_scheme) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0, Security.NONE),
        ("None", Security.NONE),
        ("none", Security.NONE),
        (1, Security.SSL_ON_CONNECT),
        ("Auto", Security.SSL_ON_CONNECT),
        (2, Security.SSL_ON_CONNECT),
        ("SslOnConnect", Security.SSL_ON_CONNECT),
        ("SSLONCONNECT", Security.SSL_ON_CONNECT),
        (3, Security.STARTTLS),
        ("StartTls", Security.STARTTLS),
        ("3", Security.STARTTLS),
        (4, Security.STARTTLS_WHEN_AVAILABLE),
        ("starttlswhenavailable", Security.STARTTLS_WHEN_AVAILABLE),
    ],
)
def test_secure_option_accepts_int_or_name(raw: Any, expected: Security) -> None:
    mailbox = parse_credentials(creds(SecureOption=raw, UseSsl=None, Port=993))
    assert mailbox.imap.security is expected


def test_plain_imap_without_tls() -> None:
    mailbox = parse_credentials(creds(UseSsl=False, Port=None))
    assert (mailbox.imap.security, mailbox.imap.port) == (Security.NONE, 143)


def test_use_ssl_on_port_143_means_starttls() -> None:
    mailbox = parse_credentials(creds(UseSsl="true", Port=143))
    assert mailbox.imap.security is Security.STARTTLS


def test_verify_certificate_defaults_on_and_can_be_turned_off() -> None:
    assert parse_credentials(creds()).imap.verify_certificate is True
    mailbox = parse_credentials(creds(VerifyCertificate=False, SmtpServer="smtp.example.com"))
    assert mailbox.imap.verify_certificate is False
    assert mailbox.smtp is not None
    assert mailbox.smtp.verify_certificate is False


# ------------------------------------------------------------------------------------------
# SMTP extension fields


@pytest.mark.parametrize(
    ("secure_option", "use_ssl", "port", "expected"),
    [
        (None, None, None, (Security.SSL_ON_CONNECT, 465)),  # TLS by default (RFC 8314)
        (None, None, 465, (Security.SSL_ON_CONNECT, 465)),
        (None, True, None, (Security.SSL_ON_CONNECT, 465)),
        (None, True, 587, (Security.STARTTLS, 587)),
        (None, True, 25, (Security.STARTTLS, 25)),
        (None, False, None, (Security.NONE, 587)),
        (SecureOption.AUTO, None, 465, (Security.SSL_ON_CONNECT, 465)),
        (SecureOption.AUTO, None, 587, (Security.STARTTLS_WHEN_AVAILABLE, 587)),
        (SecureOption.STARTTLS, None, None, (Security.STARTTLS, 587)),
        (SecureOption.SSL_ON_CONNECT, None, None, (Security.SSL_ON_CONNECT, 465)),
    ],
)
def test_smtp_security_resolution_table(
    secure_option: SecureOption | None,
    use_ssl: bool | None,
    port: int | None,
    expected: tuple[Security, int],
) -> None:
    assert resolve_smtp_security(secure_option, use_ssl, port) == expected


def test_smtp_absent_means_none() -> None:
    assert parse_credentials(creds()).smtp is None


def test_smtp_fields_build_an_endpoint() -> None:
    mailbox = parse_credentials(
        creds(SmtpServer="smtp.example.com", SmtpPort=465, SmtpSecureOption="SslOnConnect")
    )
    assert mailbox.smtp is not None
    assert (mailbox.smtp.host, mailbox.smtp.port, mailbox.smtp.security) == (
        "smtp.example.com",
        465,
        Security.SSL_ON_CONNECT,
    )


def test_smtp_url_and_host_port_forms() -> None:
    smtps = parse_credentials(creds(SmtpServer="smtps://smtp.example.com")).smtp
    assert smtps is not None
    assert (smtps.port, smtps.security) == (465, Security.SSL_ON_CONNECT)
    plain = parse_credentials(creds(SmtpServer="smtp.example.com:2525", SmtpUseSsl=False)).smtp
    assert plain is not None
    assert (plain.host, plain.port, plain.security) == ("smtp.example.com", 2525, Security.NONE)


def test_smtp_host_defaults_to_imap_host_when_only_port_given() -> None:
    smtp = parse_credentials(creds(SmtpPort=587)).smtp
    assert smtp is not None
    assert (smtp.host, smtp.port, smtp.security) == ("imap.example.com", 587, Security.STARTTLS)


def test_smtp_fields_are_not_kept_in_extra() -> None:
    mailbox = parse_credentials(creds(SmtpServer="smtp.example.com", SmtpPort=587))
    assert not {key.lower() for key in mailbox.extra} & {"smtpserver", "smtpport"}


def test_bad_smtp_server_is_named() -> None:
    assert error_of(creds(SmtpServer="https://smtp.example.com")).field == "SmtpServer"
    assert error_of(creds(SmtpServer="bad host")).field == "SmtpServer"


# ------------------------------------------------------------------------------------------
# Arrays and id lists


def test_array_keeps_good_elements_and_reports_bad_ones() -> None:
    second_id = "11111111-2222-3333-4444-555555555555"
    body = [
        creds(),
        creds(Id="nope"),
        "not an object",
        creds(Id=second_id, ServiceUrl="https://outlook.office365.com/EWS/Exchange.asmx", Protocol="imap"),
        creds(Id=second_id.upper(), Password=None),
        creds(Id=second_id),
    ]
    mailboxes, errors = parse_credentials_array(body)
    assert [m.id for m in mailboxes] == [MAILBOX_ID_LOWER, second_id]
    assert errors == [
        {"Index": 1, "Id": "nope", "Field": "[1].Id", "Message": "must be a GUID"},
        {"Index": 2, "Id": None, "Field": "[2]", "Message": "must be a JSON object"},
        {
            "Index": 3,
            "Id": second_id,
            "Field": "[3].ServiceUrl",
            "Message": "must be a host, host:port or mail server URL, not an http(s) URL or a path",
        },
        {"Index": 4, "Id": second_id.upper(), "Field": "[4].Password", "Message": "required"},
    ]
    assert PASSWORD not in repr(errors)


def test_repeated_id_keeps_the_last_element() -> None:
    mailboxes, errors = parse_credentials_array(
        [creds(UserName="first"), creds(Id=MAILBOX_ID_LOWER, UserName="second")]
    )
    assert errors == []
    assert [(m.id, m.user_name) for m in mailboxes] == [(MAILBOX_ID_LOWER, "second")]


def test_single_object_counts_as_one_element_array() -> None:
    mailboxes, errors = parse_credentials_array(creds())
    assert [m.id for m in mailboxes] == [MAILBOX_ID_LOWER]
    assert errors == []


@pytest.mark.parametrize("body", [None, 3, "text", True])
def test_array_body_of_wrong_type_is_rejected(body: Any) -> None:
    with pytest.raises(ValidationError) as info:
        parse_credentials_array(body)
    assert info.value.field == "body"


def test_empty_array_is_fine() -> None:
    assert parse_credentials_array([]) == ([], [])


def test_mailbox_ids_are_normalised_and_deduplicated() -> None:
    other = "11111111-2222-3333-4444-555555555555"
    ids = parse_mailbox_ids([MAILBOX_ID, other, MAILBOX_ID_LOWER, {"Id": other}, {"id": MAILBOX_ID}])
    assert ids == [MAILBOX_ID_LOWER, other]


def test_mailbox_id_spellings_keep_the_callers_text() -> None:
    pairs = parse_mailbox_id_spellings([MAILBOX_ID, MAILBOX_ID_LOWER, MAILBOX_ID])
    assert pairs == [(MAILBOX_ID, MAILBOX_ID_LOWER), (MAILBOX_ID_LOWER, MAILBOX_ID_LOWER)]


def test_single_id_or_object_counts_as_one_element_array() -> None:
    assert parse_mailbox_ids(MAILBOX_ID) == [MAILBOX_ID_LOWER]
    assert parse_mailbox_ids({"ID": MAILBOX_ID}) == [MAILBOX_ID_LOWER]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (["nope"], "[0]"),
        ([MAILBOX_ID, 7], "[1]"),
        ([{"Name": "x"}], "[0].Id"),
        (12, "body"),
        (None, "body"),
    ],
)
def test_bad_mailbox_ids_are_named(body: Any, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_mailbox_ids(body)
    assert info.value.field == field
