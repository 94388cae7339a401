import sys

from chat_bridge import Client

bot = Client("echo-bot", port=int(sys.argv[1]) if len(sys.argv) > 1 else 1883)


@bot.on("message-added")
def echo(event):
    m = event.message
    if m["sender_id"] != bot.user:
        bot.send_message(m["conversation_id"], "echo: " + m["body"])


bot.connect()
bot.run_forever()
