// The one place the page meets the TypeScript SDK (clients/js, bundled from its source).

import { ChatClient } from "../../js/src/index";
import type { ChatApi, ClientOptions } from "./types";

export function createClient(options: ClientOptions): ChatApi {
  return new ChatClient(options);
}
