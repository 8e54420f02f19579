-- The register keeps its own database beside the gateways' one (POSTGRES_DB).
CREATE DATABASE registry OWNER karibche;
