// The foobar.com page: lists the newest posts and adds one, through the API on the
// same origin (foobar-web passes /api/ to the application nodes).
"use strict";

const postsList = document.getElementById("posts");
const errorLine = document.getElementById("error");

function showPost(post) {
  const item = document.createElement("li");
  item.className = "post";
  item.dataset.id = post.id;
  const who = document.createElement("strong");
  who.textContent = post.author;
  const when = document.createElement("time");
  when.dateTime = post.created_at;
  when.textContent = new Date(post.created_at).toLocaleString();
  const text = document.createElement("p");
  text.textContent = post.text;
  item.append(who, " ", when, text);
  return item;
}

async function load() {
  const response = await fetch("/api/posts?limit=20", { cache: "no-store" });
  document.getElementById("served-by").textContent =
    response.headers.get("x-served-by") || "an unknown server";
  if (!response.ok) {
    errorLine.textContent = `Could not load the posts (${response.status}).`;
    return;
  }
  const page = await response.json();
  postsList.replaceChildren(...page.posts.map(showPost));
  document.body.dataset.loaded = "yes";
}

document.getElementById("new-post").addEventListener("submit", async (event) => {
  event.preventDefault();
  errorLine.textContent = "";
  const body = {
    author: document.getElementById("author").value,
    text: document.getElementById("text").value,
  };
  const response = await fetch("/api/posts", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) {
    const problem = await response.json().catch(() => ({}));
    errorLine.textContent = problem.field
      ? `${problem.field}: ${problem.error}`
      : `Could not post (${response.status}).`;
    return;
  }
  document.getElementById("text").value = "";
  await load();
});

load();
