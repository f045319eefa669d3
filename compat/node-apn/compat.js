// Sends pushes to a running Courier gateway through @parse/node-apn, configured exactly as for Apple
// except for the address, port and CA, and prints what the library reports: one JSON line per case.
//
// Input: the environment variable COURIER_COMPAT, a JSON object
//   {address: "host", port, ca: "<path>", key: "<.p8 path>", keyId, teamId,
//    cases: [{name, token, topic, id, padBytes?}]}
// Output: {"name", "sent", "status", "reason", "timestamp", "id"} per case, in order.
'use strict';

const fs = require('fs');
const apn = require('@parse/node-apn');

async function main() {
  const config = JSON.parse(process.env.COURIER_COMPAT);
  const provider = new apn.Provider({
    token: { key: fs.readFileSync(config.key), keyId: config.keyId, teamId: config.teamId },
    address: config.address,
    port: config.port,
    ca: fs.readFileSync(config.ca),
    production: false,
    requestTimeout: 10000,
  });
  try {
    for (const c of config.cases) {
      const note = new apn.Notification();
      note.topic = c.topic;
      note.id = c.id;
      note.expiry = Math.floor(Date.now() / 1000) + 3600;
      note.alert = 'Hello from node-apn';
      if (c.padBytes) {
        note.payload = { pad: 'x'.repeat(c.padBytes) };
      }
      const result = await provider.send(note, c.token);
      const line = { name: c.name, sent: result.sent.length === 1 };
      if (result.sent.length === 1) {
        line.id = result.sent[0]['apns-id'] || null;
      }
      if (result.failed.length === 1) {
        const failure = result.failed[0];
        line.status = failure.status === undefined ? null : Number(failure.status);
        line.reason = failure.response ? failure.response.reason : String(failure.error);
        line.timestamp = failure.response && failure.response.timestamp !== undefined ? failure.response.timestamp : null;
        line.id = failure['apns-id'] || null;
      }
      console.log(JSON.stringify(line));
    }
  } finally {
    await provider.shutdown();
  }
}

main().catch(error => {
  console.error(error);
  process.exit(1);
});
