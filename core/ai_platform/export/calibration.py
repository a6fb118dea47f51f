"""The fixed text on which an export's next-token distributions are compared with its fp32 source.

Written for this project (nothing downloaded): plain prose about an ordinary town, mostly English with
paragraphs in French, German, Spanish, Chinese, Arabic and Russian, and a few numbers and times, so that
quantization errors in scripts a model sees less often show up too. Every export measures on these exact
words: edit them and the recorded agreement of every folder changes meaning, so bump the recipe versions
(``__main__``) together with it.
"""

# ruff: noqa: RUF001  (the Chinese full-width commas and the Russian letters are the point)

TEXT = """\
The river town wakes early. Before six the baker has already pulled the first trays from the oven, and the \
smell of warm bread drifts across the square to the bus stop, where a few students wait with their hands in \
their pockets. By seven the market stalls are open: apples from the hills, cheese wrapped in paper, and an old \
man who repairs watches at a folding table.

Le marché du samedi est le plus animé de la semaine. Les familles arrivent tôt pour trouver des tomates mûres \
et du pain encore chaud, puis elles s'installent au café pour parler du temps et des nouvelles du quartier.

In the afternoon the library fills with quiet work. A retired engineer reads about bridges, two children share \
a book of maps, and the librarian answers a question about trains to the coast: the 14:35 service takes two \
hours and ten minutes, and a return ticket costs 18.50 euros.

Im Winter wird es früh dunkel, und die Straßen sind still. Wer noch unterwegs ist, geht schnell nach Hause, \
trinkt einen Tee und liest ein Buch, während draußen der Schnee leise auf die Dächer fällt.

La biblioteca abre a las nueve y cierra a las ocho. Muchos estudiantes vienen por la mañana o por la tarde para \
preparar sus exámenes, y a veces se quedan hasta que la bibliotecaria apaga las luces con una sonrisa.

春天来的时候，河边的树都开了花。老人们在公园里下棋，孩子们在草地上放风筝，空气里有一种新鲜的味道。

في المساء يجلس الجيران أمام بيوتهم ويتحدثون عن يومهم. يشرب بعضهم الشاي، ويلعب الأطفال في الشارع حتى يناديهم أهلهم للعشاء.

Осенью в городе становится тихо. Листья падают на мостовую, люди идут на работу в тёплых куртках, а по вечерам \
в окнах горит жёлтый свет.

When the harvest festival comes in October, the square is closed to cars for three days. There is music until \
midnight, a long table of soups from every street, and a contest for the heaviest pumpkin, won last year by a \
farmer whose pumpkin weighed 212 kilograms. Nobody remembers who won the year before, but everybody remembers \
the rain.
"""
