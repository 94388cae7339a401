import { ChatClient } from "chat-bridge-client";

const bot = new ChatClient({ user: "echo-bot", url: process.argv[2] ?? "mqtt://127.0.0.1:1883" });
bot.on("message-added", async (event) => {
  const m = event.message;
  if (m.sender_id !== bot.user) await bot.sendMessage(m.conversation_id, "echo: " + m.body);
});
for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => bot.close().then(() => process.exit(0)));
await bot.connect();
