// MQTT.js for the browser: its browser build (dist/mqtt.esm.js) has a default export only, while the
// SDK may import named functions (`import { connect } from "mqtt"`, as in Node). build.mjs points
// every "mqtt" import of the bundle here, which offers both.
// @ts-expect-error: the dist file has no type declarations of its own
import mqtt from "mqtt/dist/mqtt.esm";

export const connect = mqtt.connect;
export const connectAsync = mqtt.connectAsync;
export const MqttClient = mqtt.MqttClient;
export const Client = mqtt.Client;
export default mqtt;
