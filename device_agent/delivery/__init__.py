"""Getting samples home: the on-disk outbox, the MQTT link (the only paho importer), and the
wire protocol (topics, payload builders, JSON Schemas) both sides share."""
